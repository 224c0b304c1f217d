#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, then pytest (kernel tests need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# two processes: the modules whose tests build network namespaces and time something, one
# after the other, and beside them the rest (the simulator's sweeps, the unit tests, kernel
# tests that time nothing) on the other CPU (tests/conftest.py, --part)
rest_log=$(mktemp)
.venv/bin/pytest -q -p no:cacheprovider --part rest --durations=10 "$@" >"$rest_log" 2>&1 &
rest=$!
set +e
.venv/bin/pytest -q -p no:cacheprovider --part kernel --durations=20 "$@"
kernel=$?
wait "$rest"
others=$?
set -e
echo "=== the other tests (simulator, protocol, units) ==="
cat "$rest_log"
rm -f "$rest_log"
# 5 is "no test of this part among those asked for"
status=0
for code in "$kernel" "$others"; do
    if [[ $code -ne 0 && $code -ne 5 ]]; then status=$code; fi
done
if [[ $kernel -eq 5 && $others -eq 5 ]]; then status=5; fi
exit "$status"
