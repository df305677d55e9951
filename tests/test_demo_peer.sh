#!/usr/bin/env bash
# demo/peer_train.py (transformers + peft + torch AdamW) runs 05_train's recipe: order, losses,
# gradients and weights of a tiny model on the CPU (tests/test_demo_peer.py). torch is not in
# tests/requirements.txt (CI would download ~1 GB for this one test): the test runs with the
# first of $PEER_PYTHON, $PYTHON, python3 that has torch, transformers and peft, else skips.
cd "$(dirname "$0")/.." || exit 1
for py in "${PEER_PYTHON:-}" "${PYTHON:-}" python3; do
  [ -n "$py" ] && command -v "$py" >/dev/null 2>&1 || continue
  if "$py" -c 'import torch, transformers, peft, safetensors' 2>/dev/null; then exec "$py" tests/test_demo_peer.py; fi
done
echo "skip: no Python with torch, transformers and peft (set PEER_PYTHON to one)"
exit 77
