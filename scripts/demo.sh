#!/usr/bin/env bash
# Sets up everything (Debian packages, libvirtd, .venv), then runs the demo: a throwaway TCG VM
# under libvirt, the agent as a real process, and a full CBT cycle shown step by step.
#   scripts/demo.sh            the cycle on a VM without an OS (a few seconds)
#   scripts/demo.sh --guest    on a real Debian guest, quiesced through its guest agent
#                              (builds the guest image once, ~3 min; boots in ~30-50 s)
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if [ "${1:-}" = "--guest" ]; then
  shift
  exec .venv/bin/python -m testbed.demo --guest "$(bash scripts/guest-image.sh)" "$@"
fi
exec .venv/bin/python -m testbed.demo "$@"
