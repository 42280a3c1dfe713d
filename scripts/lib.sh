# Shared by install.sh (a hypervisor host) and setup.sh (a test machine): Debian packages and
# the venv. Sourced, not run.

log() { printf '[%s] %s\n' "${LOG_TAG:-cbt-agent}" "$*"; }

# ensure_packages PKG...: apt-get install whichever are not installed yet
ensure_packages() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# make_venv PIP_ARGS...: .venv with libnbd (Debian's binding) and the agent installed by pip
# with PIP_ARGS, every version as constraints.txt pins it
make_venv() {
  if [ ! -x .venv/bin/python ]; then
    log "creating .venv"
    python3 -m venv .venv
  fi
  # libnbd has no PyPI package: Debian's binding is built for CPython 3.11, this Python's ABI.
  local site f
  site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-311-x86_64-linux-gnu.so; do
    [ -e "$f" ] || { echo "missing $f (python3-libnbd)" >&2; exit 1; }
    ln -sf "$f" "$site/"
  done
  log "installing the agent into .venv"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -c constraints.txt "$@"
  .venv/bin/python -c 'import nbd, libvirt, qemu.qmp, aiohttp, sqlite_utils, prometheus_client' \
    || { echo "python dependencies did not import" >&2; exit 1; }
}
