#!/bin/sh
# Run every benchmark; each prints its ratios against its limit and PASS/FAIL.
# Exit status: 0 when all pass, 1 otherwise (every benchmark runs either way).
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
status=0
for b in bench_enable bench_extents bench_quiesce bench_guest bench_api; do
    echo "=== $b ==="
    limit=170
    [ "$b" = bench_api ] && limit=600  # three agent starts and 30 wrk runs
    timeout "$limit" "$PY" -m "bench.$b" || status=1
    echo
done
exit $status
