#!/usr/bin/env bash
# Create .venv and install zeroforge into it, from nothing. Idempotent: a second run is quick.
# torch goes in first and pinned: `torch==2.13.0` is a CPU wheel on these machines, and a bare
# `torch` (pulled in by DeepSpeed) would fetch a multi-GB CUDA build instead.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${ZEROFORGE_VENV:-.venv}
TORCH_SPEC=${ZEROFORGE_TORCH:-torch==2.13.0}
EXTRAS=${1:-}

if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    "${PIP[@]}" "$TORCH_SPEC" 2> >(grep -v "is ignored: it is neither" >&2)
fi
spec="."
[ -n "$EXTRAS" ] && spec=".[$EXTRAS]"
"${PIP[@]}" -e "$spec" 2> >(grep -v "is ignored: it is neither" >&2)
