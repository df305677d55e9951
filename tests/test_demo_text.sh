#!/usr/bin/env bash
# demo/extract_austen.py (the text of `make demo`) on R databases the test writes itself,
# good and hostile; standard-library Python only. Details at the top of tests/test_demo_text.py.
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "skip: no python3"; exit 77; }
exec "$PY" tests/test_demo_text.py
