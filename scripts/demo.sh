#!/usr/bin/env bash
# Sets up everything (Debian packages, libvirtd, .venv), then runs the demo: a throwaway TCG VM
# under libvirt, the agent as a real process, and a full CBT cycle shown step by step.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/cbt-agent demo "$@"
