#!/usr/bin/env bash
# Sets up a TEST MACHINE for cbt-agent (a fresh Debian 12, run as root): Debian packages
# (QEMU 7.2, libvirt 9.0, libnbd), a libvirtd that runs without systemd, and .venv with the
# agent and its test tools. It REWRITES /etc/libvirt/qemu.conf (QEMU as root, no security
# driver, no cgroups: what a machine without systemd needs). Never run it on a production
# hypervisor: scripts/install.sh installs the agent there and leaves libvirt alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

LOG_TAG=setup
. scripts/lib.sh

# the agent's own packages, and what the tests need: QEMU to run VMs, libvirtd, openssl for
# test certificates, debootstrap and e2fsprogs for the guest image, wrk for bench/bench_api
ensure_packages qemu-system-x86 qemu-utils python3-libnbd libnbd-bin openssl \
  libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev pkg-config \
  debootstrap e2fsprogs python3-venv wrk

# libvirtd without systemd: a user it can parse, and a qemu.conf that needs no virtlogd,
# no cgroups, no namespaces and no relabelling (see shared ENVIRONMENT.md).
id libvirt-qemu >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin libvirt-qemu
QEMU_CONF=/etc/libvirt/qemu.conf
if ! grep -q '^# cbt-agent setup' "$QEMU_CONF" 2>/dev/null; then
  log "writing $QEMU_CONF (the original kept as $QEMU_CONF.orig)"
  mkdir -p /etc/libvirt
  [ ! -e "$QEMU_CONF" ] || [ -e "$QEMU_CONF.orig" ] || cp -p "$QEMU_CONF" "$QEMU_CONF.orig"
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

# the test tools too (pytest, ruff, mypy, schemathesis), editable: tests run this checkout
make_venv -e ".[dev]"
log "ready: .venv/bin/cbt-agent"
