#!/usr/bin/env bash
# docs/DESIGN.md's "LongLoRA in six places" names code as file:line: every one of those lines
# must still be where the name is defined (tests/design_refs.py; --fix moves them).
cd "$(dirname "$0")/.." || exit 1
exec python3 tests/design_refs.py
