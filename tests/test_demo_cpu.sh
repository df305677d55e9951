#!/usr/bin/env bash
# The demo's pipeline (demo/run.sh, the script `make demo` runs) end to end on the CPU, on a
# tiny model and a tiny text, offline:
#   a fresh random tiny LLaMA (tests/test_demo_convert.py's: D=96, H=3, Hk=1, L=2, V=269,
#   byte-level BPE) written as a GGUF and converted by the demo's own demo/convert_gguf.py;
#   train and held-out texts made here from a word list; the run scaled as the CPU version
#   is (original context taken as 128, target 512 = x4, by YaRN x6, run.sh's default: 1.5x the
#   stretch), 8 steps.
# Checked: every step ran (its heading, in order, and the final line); the before and after
# results hold a finite perplexity (1 < ppl < 10 V) at each of 128/256/512 and a passkey
# accuracy in [0, 1] over 2 trials; the fine-tune logged 8 finite losses and its adapter
# lowered the held-out perplexity at the trained length (text from the same word list, so
# training on it must help); the table has a row per length with both columns and the plot is
# a PNG; the run said it is the scaled-down CPU version. The run's model is the linked copy
# whose config.json says yarn x6 over 128 tokens, 05_train, 06_infer and the peer report that
# RoPE (with YaRN's attention factor 1.0, run.sh's default), and the results are labelled
# YaRN x6; by default LoRA and the norms train, the embeddings stay frozen (05_train's line,
# the adapter's modules_to_save, the peer's run.json, run.txt); DEMO_ROPE=pi,
# DEMO_YARN_ATTENTION=-1, DEMO_YARN_FACTOR=3 (below the stretch) and DEMO_TRAIN_PARTS=embed are
# refused; `run.sh --which-device` picks
# the GPU size exactly where a GPU answers and the programs link cuBLAS, and DEMO_DEVICE=tpu is
# refused. Nothing is downloaded. Where a Python
# has torch, transformers and peft ($PEER_PYTHON, $PYTHON, python3), DEMO_PEER=1 adds the
# PyTorch peer: its step ran, its column and training.md are there.
cd "$(dirname "$0")/.." || exit 1
. tests/demo_tiny.sh
PY=${PYTHON:-python3}
if ! "$PY" -c 'import gguf, numpy' 2>/dev/null; then
  echo "skip: $PY has no gguf/numpy (make test installs tests/requirements.txt into .venv)"
  exit 77
fi
demo_test_start 01_tokenize 02_model 05_train 06_infer

make_tiny_demo "$TMP" "$SEED" train.txt:12000 eval.txt:3000 || { echo "FAIL: could not make the tiny model and text"; exit 1; }

# with a Python that has torch, transformers and peft, the run adds the PyTorch peer (DEMO_PEER=1)
find_peer_python
PEER=$([ -n "$PEER_PY" ] && echo 1 || echo 0)
DEMO_PEER=$PEER DEMO_PEER_PYTHON=$PEER_PY \
DEMO_MODEL=$TMP/model DEMO_TRAIN_TEXT=$TMP/train.txt DEMO_EVAL_TEXT=$TMP/eval.txt DEMO_WORK=$TMP/work \
DEMO_OUT=$TMP/out DEMO_DEVICE=cpu DEMO_PYTHON=$PY LONGLORA_CACHE=$TMP/cache \
DEMO_ORIG_CTX=128 DEMO_CTX=512 DEMO_STEPS=8 DEMO_LR=3e-3 DEMO_WARMUP=1 DEMO_PPL_LENGTHS=128,256,512 \
DEMO_PPL_STRIDE=256 DEMO_PPL_WINDOWS=2 DEMO_PASSKEY_INTERVAL=256 DEMO_PASSKEY_MAX=256 DEMO_PASSKEY_TRIALS=2 \
  timeout 300 bash demo/run.sh > "$TMP/run.log" 2>&1
rc=$?
[ $rc -eq 0 ] && ok || { bad "demo/run.sh exited $rc"; tail -n 15 "$TMP/run.log"; }

# every step, in order
prev=0
steps=("1. model" "2. text" "3. tokenize" "4. the model in C" "5. before" "6. LongLoRA fine-tune" "7. after")
[ "$PEER" = 1 ] && steps+=("8. the PyTorch peer")
for step in "${steps[@]}" "9. table and plot" "done in"; do
  line=$(grep -n "^== $step" "$TMP/run.log" | head -n 1 | cut -d: -f1)
  if [ -n "$line" ] && [ "$line" -gt "$prev" ]; then ok; prev=$line; else bad "step '$step' missing or out of order"; fi
done
grep -q "scaled-down CPU version" "$TMP/run.log" && ok || bad "the run does not say it is the scaled-down CPU version"
grep -q "downloading" "$TMP/run.log" && bad "the run downloaded something" || ok

"$PY" - "$TMP/out" 269 "$PEER" <<'EOF' && ok || bad "results: see above"
import csv, json, math, os, sys
out, vocab, peer = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1"
res = {}
for label in ("before", "after"):
    data = json.load(open(os.path.join(out, label + ".json")))
    rows = {r["length"]: r for r in data["results"]}
    assert sorted(rows) == [128, 256, 512], (label, sorted(rows))
    for n, r in rows.items():
        p = r["perplexity"]
        assert p is not None and math.isfinite(p) and 1 < p < 10 * vocab, (label, n, p)
    r = rows[256]
    assert r["trials"] == 2 and 0 <= r["passkey_accuracy"] <= 1, (label, r)
    assert all("passkey_accuracy" not in rows[n] for n in (128, 512)), "passkey rows at lengths not in its grid"
    res[label] = rows
# the adapter was trained on text like the held-out one: it must help at the trained length
b, a = res["before"][512]["perplexity"], res["after"][512]["perplexity"]
assert a < 0.95 * b, "held-out perplexity at 512: before %.3f, after %.3f" % (b, a)
steps = list(csv.DictReader(open(os.path.join(out, "train_log.csv"))))
assert len(steps) == 8 and all(math.isfinite(float(s["loss"])) for s in steps), steps
table = open(os.path.join(out, "before_after.md")).read().splitlines()
for n in (128, 256, 512):
    row = [l for l in table if l.startswith("| %d |" % n)]
    assert len(row) == 1 and row[0].count("|") == (8 if peer else 6), (n, row)
if peer:  # the PyTorch peer: its evaluation at every length, both trainings side by side
    rows = {r["length"]: r for r in json.load(open(os.path.join(out, "peer.json")))["results"]}
    assert sorted(rows) == [128, 256, 512] and all(1 < r["perplexity"] < 10 * vocab for r in rows.values()), rows
    training = open(os.path.join(out, "training.md")).read()
    assert "05_train" in training and "peer_train.py" in training, training
png = open(os.path.join(out, "before_after.png"), "rb").read()
assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000, len(png)
# YaRN, the default: the run's model copy says so, and every program ran it
cfg = json.load(open(os.path.join(out, "..", "work", "model-ctx128-yarn-x6", "config.json")))
assert cfg["rope_scaling"] == {"rope_type": "yarn", "factor": 6.0, "original_max_position_embeddings": 128, "attention_factor": 1.0} and \
    cfg["max_position_embeddings"] == 768, cfg
assert all(r["rope"] == "YaRN x6" for label in res for r in res[label].values())
for log in ("before.log", "after.log"):
    assert "RoPE yarn factor 6" in open(os.path.join(out, log)).read(), log
assert "rope yarn" in open(os.path.join(out, "train.log")).read().lower(), "05_train's log does not name yarn"
if peer:
    assert "RoPE yarn x6" in open(os.path.join(out, "peer_train.log")).read()
    assert all(r["rope"] == "yarn-x6" for r in rows.values()), rows
print("results: ppl at 512 before %.2f, after %.2f; %d training steps; table and plot written%s"
      % (b, a, len(steps), "; the PyTorch peer %.2f" % rows[512]["perplexity"] if peer else " (no torch: without the peer)"))
EOF

grep -q "512 (YaRN x6, attention factor 1.0)" "$TMP/run.log" && ok || bad "the run's description does not name YaRN's attention factor 1.0"

# what trains by default: LoRA and the norms, the embeddings frozen (DEMO_TRAIN_PARTS=lora+norms,
# the ablations' choice): 05_train says so, the saved adapter carries the norms but not
# embed_tokens, and the peer trained the same parts
grep -q "LoRA r=8 alpha 16 on q,k,v,o + norms)" "$TMP/out/train.log" && ok || bad "05_train's model line does not say LoRA + norms: $(grep '^model:' "$TMP/out/train.log")"
"$PY" - "$TMP/work/adapter-cpu/adapter_config.json" <<'EOF2' && ok || bad "the adapter's modules_to_save are not the norms alone"
import json, sys
m = json.load(open(sys.argv[1]))["modules_to_save"]
assert "embed_tokens" not in m and "input_layernorm" in m and "norm" in m, m
EOF2
if [ "$PEER" = 1 ]; then
  "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); assert r["train"] == "lora+norms", r["train"]' "$TMP/out/peer_run.json" && ok \
    || bad "the peer did not train lora+norms"
fi
grep -q "trains LoRA r=8 on q,k,v,o + norms" "$TMP/out/run.txt" && ok || bad "run.txt does not say what trained"

# a setting run.sh does not take (a RoPE kind it does not know, an attention factor that is not
# a positive number, a YaRN factor below the stretch, trained parts it does not know) is
# refused with its sentence, before the LongLoRA part: demo_refuses NAME SETTING SENTENCE
demo_refuses() {
  env "$2" DEMO_MODEL=$TMP/model DEMO_TRAIN_TEXT=$TMP/train.txt DEMO_EVAL_TEXT=$TMP/eval.txt DEMO_WORK=$TMP/work \
    DEMO_OUT=$TMP/out-$1 DEMO_DEVICE=cpu DEMO_PYTHON=$PY LONGLORA_CACHE=$TMP/cache DEMO_ORIG_CTX=128 DEMO_CTX=512 \
    timeout 120 bash demo/run.sh > "$TMP/$1.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && grep -qF "$3" "$TMP/$1.log" && ok || bad "$2: exit $rc, $(tail -n 1 "$TMP/$1.log")"
}
demo_refuses parts DEMO_TRAIN_PARTS=embed "DEMO_TRAIN_PARTS must be lora+norms, lora+embed+norms, lora+embed or lora, got 'embed'"
demo_refuses attention DEMO_YARN_ATTENTION=-1 "DEMO_YARN_ATTENTION must be a number above 0 or auto"
demo_refuses factor DEMO_YARN_FACTOR=3 "DEMO_YARN_FACTOR must be a whole number at least the stretch 4, got '3'"
demo_refuses rope DEMO_ROPE=pi "DEMO_ROPE must be yarn or linear"

# which size runs: with a GPU that answers (a stand-in nvidia-smi on PATH) the GPU size exactly
# when 05_train and 06_infer were built with CUDA (they link cuBLAS); without one the CPU size;
# DEMO_DEVICE overrides and must be cpu or gpu (under pipefail a `grep -q` once made every GPU
# machine pick the CPU size)
mkdir -p "$TMP/fakebin"
printf '#!/bin/sh\necho "GPU 0: Stand-in GPU (UUID: GPU-0)"\n' > "$TMP/fakebin/nvidia-smi"
chmod +x "$TMP/fakebin/nvidia-smi"
want=cpu; ldd ./05_train ./06_infer 2>/dev/null | grep cublas > /dev/null && want=gpu
got=$(PATH="$TMP/fakebin:$PATH" bash demo/run.sh --which-device 2>&1)
[ "$got" = "$want" ] && ok || bad "with a GPU, built $([ $want = gpu ] && echo with || echo without) CUDA: picked '$got', not $want"
got=$(PATH="$TMP/nogpu:/usr/bin:/bin" bash demo/run.sh --which-device 2>&1)
[ "$got" = cpu ] && ok || bad "without nvidia-smi: picked '$got', not cpu"
got=$(DEMO_DEVICE=gpu bash demo/run.sh --which-device 2>&1)
[ "$got" = gpu ] && ok || bad "DEMO_DEVICE=gpu: picked '$got'"
out=$(DEMO_DEVICE=tpu bash demo/run.sh --which-device 2>&1); rc=$?
[ $rc -ne 0 ] && [ "$out" = "demo: DEMO_DEVICE must be cpu or gpu, got 'tpu'" ] && ok || bad "DEMO_DEVICE=tpu: exit $rc, said: $out"

if [ $fails -ne 0 ]; then echo "--- run.log"; cat "$TMP/run.log"; fi
echo "test_demo_cpu: $checks checks, $fails failures (seed $SEED; the demo pipeline on a tiny model, CPU, offline)"
[ $fails -eq 0 ]
