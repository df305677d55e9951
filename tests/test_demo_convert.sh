#!/usr/bin/env bash
# demo/convert_gguf.py on tiny random GGUF files written by the test (no download, < 1 min).
# The checks and their tolerances are described at the top of tests/test_demo_convert.py.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if ! "$PY" -c 'import gguf, numpy, tokenizers' 2>/dev/null; then
  echo "skip: $PY has no gguf/numpy/tokenizers (make test installs tests/requirements.txt into .venv)"
  exit 77
fi
exec "$PY" tests/test_demo_convert.py
