#!/usr/bin/env bash
# Install everything (see setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/system-deps.sh
exec .venv/bin/python -m pytest tests "$@"
