#!/usr/bin/env bash
# The whole test suite: set-up, lint, type check, then pytest (kernel tests need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check src tests bench
.venv/bin/mypy
exec .venv/bin/pytest -q -p no:cacheprovider --durations=20 "$@"
