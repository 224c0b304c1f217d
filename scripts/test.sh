#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, then pytest (kernel tests need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
# two workers: the tests that build namespaces on one, in order (tests/conftest.py), the rest
# beside them on the other
exec .venv/bin/pytest -q -p no:cacheprovider -n 2 --dist loadgroup --durations=20 "$@"
