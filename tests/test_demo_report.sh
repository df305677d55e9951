#!/usr/bin/env bash
# demo/report.py's plot without matplotlib carries its words (tests/test_demo_report.py).
cd "$(dirname "$0")/.." || exit 1
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
exec python3 tests/test_demo_report.py
