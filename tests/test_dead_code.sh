#!/usr/bin/env bash
# No dead code: every function some program or test calls (tests/dead_code.py).
cd "$(dirname "$0")/.." || exit 1
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
exec python3 tests/dead_code.py
