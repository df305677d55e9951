# Shared by the demo's shell tests (sourced): the tiny demo model and texts, and the Python
# for the PyTorch peer. Needs $PY (a Python with gguf and numpy), run from the repo root.

# make_tiny_demo DIR SEED NAME:WORDS... -- DIR/model: a random tiny LLaMA written as a GGUF
# (tests/test_demo_convert.py) and converted by demo/convert_gguf.py as the demo converts
# SmolLM2; DIR/NAME: generated text of WORDS words from a small vocabulary, for each NAME.
make_tiny_demo() {
  "$PY" - "$@" <<'PYEOF'
import os, subprocess, sys
import numpy as np
tmp, seed = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, "tests")
import test_demo_convert as tiny
rng = np.random.default_rng(seed)
tiny.write_gguf(os.path.join(tmp, "tiny.gguf"), tiny.random_model(rng, False))
r = subprocess.run([sys.executable, "demo/convert_gguf.py", os.path.join(tmp, "tiny.gguf"), os.path.join(tmp, "model")],
                   capture_output=True, text=True)
if r.returncode:
    sys.exit("converter: " + r.stderr.strip())
words = "the man is a good wife who said that she was in want of it and me".split()
for spec in sys.argv[3:]:
    name, n = spec.split(":")
    text = " ".join(words[i] for i in rng.integers(0, len(words), int(n)))
    open(os.path.join(tmp, name), "w").write(text.replace(" the ", ". The ") + ".\n")
PYEOF
}

# PEER_PY: the first of $PEER_PYTHON, $PY, python3 that has torch, transformers, peft and
# safetensors (the PyTorch peer, demo/peer_train.py); empty when none has.
find_peer_python() {
  PEER_PY=
  local p
  for p in "${PEER_PYTHON:-}" "$PY" python3; do
    [ -n "$p" ] && command -v "$p" >/dev/null 2>&1 || continue
    if "$p" -c 'import torch, transformers, peft, safetensors' 2>/dev/null; then PEER_PY=$p; return 0; fi
  done
}

# demo_test_start PROG... -- a demo test's start: skips (exit 77) unless each program is
# built; TMP, a folder removed at exit; the counts of tests/check.sh (ok, bad, check,
# refused) from zero; SEED, fresh for this run.
demo_test_start() {
  local prog
  for prog; do
    if [ ! -x "./$prog" ]; then echo "skip: ./$prog is not built (make $prog)"; exit 77; fi
  done
  TMP=$(mktemp -d)
  trap 'rm -rf "$TMP"' EXIT
  SEED=$(od -An -N4 -tu4 /dev/urandom | tr -d ' ')
}
. tests/check.sh
