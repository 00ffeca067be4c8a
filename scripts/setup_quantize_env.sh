#!/usr/bin/env bash
# Create the quantization environment: llm-compressor + this package, apart from vLLM's.
#
# Why a second environment: every llm-compressor release pins compressed-tensors exactly, and none pins
# the 0.17.0 that vLLM 0.29 pins, so the two can never share one (docs/notes.md: Versions). A checkpoint written here
# (compressed-tensors 0.19) is read by vLLM's 0.17. The batch and serve code never import llm-compressor.
#
#  1. torch's CPU build first (this machine's pip finds it in its find-links directory; elsewhere it
#     comes from PyTorch's CPU index), so llm-compressor's `torch<=2.14` resolves to it rather than to
#     a multi-GB CUDA build. On a GPU node, skip this line and let pip take the CUDA torch.
#  2. this package with its `quantize` extra (llmcompressor==0.14.0.1), editable, so
#     `python -m jobs.quantize` runs from the checkout.
# Usage: scripts/setup_quantize_env.sh [VENV_DIR]  (default .venv-quantize; idempotent: a stamp newer
# than pyproject.toml and this script means done)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-quantize}"
PY="${PYTHON:-python3}"
STAMP="$VENV/.setup-complete"

if [ -f "$STAMP" ] && [ "$STAMP" -nt "$ROOT/pyproject.toml" ] && [ "$STAMP" -nt "$0" ]; then
    exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
if ! $PIP install -q "torch==2.13.0+cpu" 2>/dev/null; then
    $PIP install -q "torch==2.13.0+cpu" --index-url https://download.pytorch.org/whl/cpu
fi
$PIP install -q -e "$ROOT[quantize]"
"$VENV/bin/python" -c "import torch, llmcompressor, compressed_tensors, transformers; print('quantize env ready: torch', torch.__version__, 'llmcompressor', llmcompressor.__version__, 'compressed-tensors', compressed_tensors.__version__, 'transformers', transformers.__version__)"
touch "$STAMP"
