#!/bin/sh
# Run every benchmark; each prints its ratios against its limit and PASS/FAIL.
# Exit status: 0 when all pass, 1 otherwise (every benchmark runs either way).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
status=0
for b in bench_enable bench_extents bench_quiesce bench_guest bench_dirtymap bench_api bench_backup; do
    echo "=== $b ==="
    limit=170
    [ "$b" = bench_api ] && limit=600  # three agent starts and 30 wrk runs
    [ "$b" = bench_backup ] && limit=960  # fulls, restores and incrementals, three parties
    timeout "$limit" "$PY" -m "bench.$b" || status=1
    echo
done
# 100 VMs: starting and removing them alone takes a minute or two (its own budget: 540 s)
echo "=== bench_scale ==="
timeout 600 "$PY" -m bench.bench_scale || status=1
exit $status
