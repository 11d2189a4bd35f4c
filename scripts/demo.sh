#!/usr/bin/env bash
# Install everything (see setup.sh) and run the main job end to end on the builtin offline corpus.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/zeroforge demo "$@"
