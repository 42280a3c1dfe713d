#!/usr/bin/env bash
# Installs cbt-agent on a hypervisor host (Debian 12, as root), leaving libvirt and QEMU as the
# host has them: it never edits /etc/libvirt, never starts or stops libvirtd.
#
#   scripts/install.sh            the Debian packages the agent needs (qemu-utils, libnbd), a
#                                 venv in .venv with the agent (no test tools), the systemd
#                                 unit, /etc/cbt-agent/config.toml from the example (0600)
#
# Then replace the example token in /etc/cbt-agent/config.toml (the agent refuses it and any
# token under 16 characters): api.tokens = ["<output of openssl rand -hex 32>"], or
# api.token_file (chmod 600); and
#   systemctl enable --now cbt-agent
#
# DESTDIR=/some/dir puts the unit and the config under that directory instead of / (tests).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
LOG_TAG=install
. scripts/lib.sh

ensure_packages qemu-utils python3-libnbd libnbd-bin python3-venv
make_venv "$ROOT"

DESTDIR=${DESTDIR:-}
ETC=$DESTDIR/etc
install -d -m 755 "$ETC/systemd/system"
UNIT=$ETC/systemd/system/cbt-agent.service
log "installing $UNIT (ExecStart $ROOT/.venv/bin/cbt-agent)"
sed "s|/opt/cbt-agent/|$ROOT/|g" systemd/cbt-agent.service >"$UNIT.tmp"
chmod 644 "$UNIT.tmp"
mv "$UNIT.tmp" "$UNIT"

install -d -m 700 "$ETC/cbt-agent"
if [ ! -e "$ETC/cbt-agent/config.toml" ]; then
  log "writing $ETC/cbt-agent/config.toml (0600) from config.example.toml: replace its token"
  install -m 600 config.example.toml "$ETC/cbt-agent/config.toml"
fi
if [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
fi
log "installed. Next: set api.tokens in /etc/cbt-agent/config.toml (openssl rand -hex 32), then"
log "  systemctl enable --now cbt-agent && systemctl status cbt-agent"
