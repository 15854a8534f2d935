#!/usr/bin/env bash
# The README's first command: install if needed, then API + worker + Redis on this machine.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lookalike serve "$@"
