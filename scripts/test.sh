#!/usr/bin/env bash
# The README's second command: install if needed, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
LOOKALIKE_EXTRAS=worker,embedded,test bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
exec .venv/bin/python -m pytest "$@"
