#!/usr/bin/env bash
# Install everything (see setup.sh) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
bash scripts/system-deps.sh
# The venv first on PATH: launchers and DeepSpeed's JIT build (ninja) then come from the venv in
# every test, so the C++ op built once is reused instead of rebuilt by a different ninja.
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m pytest tests "$@"
