#!/usr/bin/env bash
# Sets up everything (Debian packages, libvirtd, .venv) and runs every check: ruff, mypy, and
# the whole pytest suite against the real QEMU + libvirtd + libnbd stack.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
echo "[test] ruff"
.venv/bin/ruff check cbt_agent testbed tests bench
.venv/bin/ruff format --check cbt_agent testbed tests bench
echo "[test] mypy --strict"
.venv/bin/mypy
echo "[test] guest image (built once, cached: scripts/guest-image.sh)"
bash scripts/guest-image.sh >/dev/null
echo "[test] pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
