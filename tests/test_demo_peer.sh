#!/usr/bin/env bash
# demo/peer_train.py (transformers + peft + torch AdamW) runs 05_train's recipe: the data order
# (standard library only, so CI checks it), then order, losses, gradients and weights of a tiny
# model trained by both on the CPU (tests/test_demo_peer.py). torch is not in
# tests/requirements.txt (CI would download about 1 GB for this one test): the training part
# runs with the first of $PEER_PYTHON, $PYTHON, python3 that has torch, transformers and peft,
# and skips where none has.
cd "$(dirname "$0")/.." || exit 1
for py in "${PEER_PYTHON:-}" "${PYTHON:-}" python3; do
  [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
  if "$py" -c 'import torch, transformers, peft, safetensors' 2>/dev/null; then exec "$py" tests/test_demo_peer.py; fi
done
command -v python3 >/dev/null || { echo "skip: no python3"; exit 77; }
exec python3 tests/test_demo_peer.py
