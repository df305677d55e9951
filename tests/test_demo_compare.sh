#!/usr/bin/env bash
# demo/compare_training.py's table and its refusals of hostile inputs (tests/test_demo_compare.py).
cd "$(dirname "$0")/.." || exit 1
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
exec python3 tests/test_demo_compare.py
