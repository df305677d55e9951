#!/usr/bin/env bash
# The demo's path on a tiny random model: GGUF -> demo/convert_gguf.py -> ./01_tokenize and
# ./02_model, against tokenizers and a numpy forward. Details at the top of the .py file.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if ! "$PY" -c 'import gguf, numpy, tokenizers' 2>/dev/null; then
  echo "skip: $PY has no gguf/numpy/tokenizers (make test installs tests/requirements.txt into .venv)"
  exit 77
fi
exec "$PY" tests/test_demo_pipeline.py
