#!/usr/bin/env bash
# Installs everything cbt-agent needs on a fresh Debian 12 host (run as root):
# Debian packages (QEMU 7.2, libvirt 9.0, libnbd), a libvirtd that runs without systemd,
# and a venv in .venv with the agent installed (.venv/bin/cbt-agent).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

log() { printf '[setup] %s\n' "$*"; }

PKGS=(qemu-system-x86 qemu-utils python3-libnbd libnbd-bin openssl
      libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config
      debootstrap e2fsprogs)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# libvirtd without systemd: a user it can parse, and a qemu.conf that needs no virtlogd,
# no cgroups, no namespaces and no relabelling (see shared ENVIRONMENT.md).
id libvirt-qemu >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu
QEMU_CONF=/etc/libvirt/qemu.conf
if ! grep -q '^# cbt-agent setup' "$QEMU_CONF" 2>/dev/null; then
  log "writing $QEMU_CONF"
  mkdir -p /etc/libvirt
  cat >"$QEMU_CONF" <<'CONF'
# cbt-agent setup: libvirtd without systemd, virtlogd, cgroups or namespaces
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
CONF
fi
"$ROOT/scripts/libvirtd.sh" start

if [ ! -x .venv/bin/python ]; then
  log "creating .venv"
  python3 -m venv .venv
fi
# libnbd has no PyPI package: Debian's binding is built for CPython 3.11, this Python's ABI.
SITE=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
for f in /usr/lib/python3/dist-packages/nbd.py /usr/lib/python3/dist-packages/libnbdmod.cpython-311-x86_64-linux-gnu.so; do
  [ -e "$f" ] || { echo "missing $f (python3-libnbd)" >&2; exit 1; }
  ln -sf "$f" "$SITE/"
done
log "installing the agent into .venv"
.venv/bin/pip install -q --upgrade pip >/dev/null
# every version exactly as the suite last passed with it (constraints.txt)
.venv/bin/pip install -q -c constraints.txt -e ".[dev]"
.venv/bin/python -c 'import nbd, libvirt, qemu.qmp, aiohttp, sqlite_utils' \
  || { echo "python dependencies did not import" >&2; exit 1; }
log "ready: .venv/bin/cbt-agent"
