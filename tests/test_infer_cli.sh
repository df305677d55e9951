#!/usr/bin/env bash
# tests/test_infer_cli.sh: ./06_infer as a user runs it (CPU, tiny random models).
#  1. user errors end with one clear sentence and exit 1 (never a signal): a context whose KV
#     cache does not fit in memory (the message gives the GiB needed), a prompt longer than
#     the context, ids outside the vocabulary, a missing adapter, bad flags;
#  2. generation: greedy is deterministic, a seed reproduces sampling, --max-new bounds the
#     output, --template llama2-chat runs, prefill and decode tokens/s are printed;
#  3. perplexity: several --seq-len values print one row each; the startup line says where it
#     runs and why (no --device: the GPU where there is one, else the CPU; --device cpu);
#  4. passkey: the CSV has one row per (length, trial), its accuracy per length is the table's,
#     depths stay inside the filler, a seed reproduces the CSV and another seed changes the keys;
#  5. export: sharded bf16 folder with index, config and the tokenizer copied; its perplexity
#     matches base + adapter within bf16 rounding.
# Parts 2, 4 and 5 need LLaMA-2's tokenizer from ../shared/data (skipped, with a note, without it).
cd "$(dirname "$0")/.." || exit 1
BIN=./06_infer
[ -x "$BIN" ] || make -s 06_infer >/dev/null || { echo "cannot build 06_infer"; exit 1; }
TMP=$(mktemp -d); trap 'rm -rf "$TMP"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
. tests/check.sh
PY=${PYTHON:-python3}
command -v "$PY" >/dev/null || { echo "skip: no python3 (to write the token files and read the CSV)"; exit 77; }
# raw_ids FILE SEED N HIGH: N ids drawn from [0, HIGH) as a raw uint16 file (LongLoRA's .bin)
raw_ids() { "$PY" -c "import array, random, sys; r = random.Random($2); array.array('H', [r.randrange($4) for _ in range($3)]).tofile(open(sys.argv[1], 'wb'))" "$1"; }
raw_ids "$TMP/ids.bin" 1 1200 256 || { echo "FAIL: $PY could not write a token file"; exit 1; }
"$PY" -c "import array, sys; array.array('H', [300] * 600).tofile(open(sys.argv[1], 'wb'))" "$TMP/big_ids.bin"

# 1. user errors
refused "huge context" "needs a KV cache of .* GiB" $BIN --init random --shape tiny --ctx 100000000000 --ppl "$TMP/ids.bin"
refused "ids outside the vocabulary" "outside the vocabulary" $BIN --init random --shape tiny --ctx 256 --ppl "$TMP/big_ids.bin"
refused "seq-len over ctx" "longer than the context" $BIN --init random --shape tiny --ctx 128 --ppl "$TMP/ids.bin" --seq-len 256
refused "too few tokens" "too few" $BIN --init random --shape tiny --ctx 4096 --ppl "$TMP/ids.bin" --seq-len 1100
refused "missing adapter" "adapter_config.json" $BIN --model tests/fixtures/infer/base --adapter "$TMP/none" --ppl "$TMP/ids.bin"
refused "two jobs" "exactly one job" $BIN --init random --shape tiny --ppl "$TMP/ids.bin" --passkey
refused "unknown flag" "unknown flag" $BIN --init random --shape tiny --ppl "$TMP/ids.bin" --frobnicate 3
refused "bad number" "expects an integer" $BIN --init random --shape tiny --ppl "$TMP/ids.bin" --stride 1.5
refused "gpu in a CPU build or bad head_dim" "GPU\|head_dim\|CUDA" $BIN --init random --shape tiny --device gpu --ppl "$TMP/ids.bin"

# 3. perplexity table
$BIN --init random --shape tiny --ctx 256 --ppl "$TMP/ids.bin" --seq-len 64,128,256 --stride 128 >"$TMP/ppl" 2>"$TMP/err"
rows=$(grep -cE '^(64|128|256) ' "$TMP/ppl")
if [ "$rows" = 3 ]; then ok; else bad "perplexity table has $rows rows, want 3"; cat "$TMP/ppl" "$TMP/err"; fi
awk '$1 ~ /^[0-9]+$/ { if (!($4 > 1 && $4 < 1e6)) exit 1 }' "$TMP/ppl" && ok || bad "perplexity out of range: $(cat "$TMP/ppl")"
# the device: without --device the startup line says where it runs and why (the rule 05_train
# follows, 04_load.c's device_choose): on a machine without a GPU (CI), the CPU
if grep -qE "; on the (CPU|GPU) \(.*\) in (fp32|bf16); host weights .* peak host RSS" "$TMP/err"; then ok; else bad "the startup line lacks the device and why: $(cat "$TMP/err")"; fi
if ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
  grep -qE "on the CPU \((no CUDA GPU is visible|this build has no CUDA)" "$TMP/err" && ok || bad "no GPU here, yet: $(head -1 "$TMP/err")"
fi
$BIN --init random --shape tiny --ctx 256 --ppl "$TMP/ids.bin" --seq-len 64 --device cpu >"$TMP/ppl" 2>"$TMP/err"
grep -q "on the CPU (--device cpu) in fp32" "$TMP/err" && ok || bad "--device cpu is not on the startup line: $(cat "$TMP/err")"

TOK=../shared/data/llama2-tokenizer/tokenizer.model
if [ ! -f "$TOK" ]; then
  checks_summary "test_infer_cli (generation and passkey skipped: $TOK is absent)" && exit 77 || exit 1
fi
M="--init random --shape tiny-llama2 --tokenizer $TOK"

# 1b. a prompt longer than the context
yes "the quick brown fox jumps over the lazy dog" | head -n 40 >"$TMP/long.txt"
refused "prompt over ctx" "do not fit the context" $BIN $M --ctx 64 --prompt-file "$TMP/long.txt" --max-new 4

# 2. generation
$BIN $M --ctx 256 --prompt "Once upon a time" --max-new 12 >"$TMP/g1" 2>"$TMP/e1"
$BIN $M --ctx 256 --prompt "Once upon a time" --max-new 12 >"$TMP/g2" 2>/dev/null
cmp -s "$TMP/g1" "$TMP/g2" && [ -s "$TMP/g1" ] && ok || bad "greedy generation is not deterministic (or empty)"
grep -q "prefill: .* tokens/s); decode: .* tokens/s" "$TMP/e1" && ok || bad "no prefill/decode tokens/s line: $(cat "$TMP/e1")"
n=$(grep -o "decode: [0-9]* tokens" "$TMP/e1" | grep -o "[0-9]*")
[ "${n:-99}" -le 12 ] && ok || bad "decoded $n tokens with --max-new 12"
$BIN $M --ctx 256 --prompt "Once upon a time" --max-new 12 --temperature 0.9 --top-p 0.9 --seed 7 >"$TMP/s1" 2>/dev/null
$BIN $M --ctx 256 --prompt "Once upon a time" --max-new 12 --temperature 0.9 --top-p 0.9 --seed 7 >"$TMP/s2" 2>/dev/null
$BIN $M --ctx 256 --prompt "Once upon a time" --max-new 12 --temperature 0.9 --top-p 0.9 --seed 8 >"$TMP/s3" 2>/dev/null
cmp -s "$TMP/s1" "$TMP/s2" && ok || bad "the same seed sampled different text"
cmp -s "$TMP/s1" "$TMP/s3" && bad "seeds 7 and 8 sampled the same 12 tokens" || ok
$BIN $M --ctx 256 --prompt "Write a haiku." --template llama2-chat --max-new 4 >/dev/null 2>"$TMP/e4" && ok || bad "llama2-chat template: $(cat "$TMP/e4")"

# 4. passkey
P="--ctx 1024 --passkey --max-tokens 600 --interval 300 --trials 3"
$BIN $M $P --seed 11 --csv "$TMP/pk1.csv" >"$TMP/pk1" 2>"$TMP/pe1" || bad "passkey run failed: $(cat "$TMP/pe1")"
$BIN $M $P --seed 11 --csv "$TMP/pk2.csv" >/dev/null 2>&1
$BIN $M $P --seed 12 --csv "$TMP/pk3.csv" >/dev/null 2>&1
cmp -s "$TMP/pk1.csv" "$TMP/pk2.csv" && ok || bad "the same seed gave a different passkey CSV"
"$PY" - "$TMP/pk1.csv" "$TMP/pk3.csv" "$TMP/pk1" <<'EOF' && ok || bad "passkey CSV bookkeeping"
import csv, re, sys
rows = list(csv.DictReader(open(sys.argv[1])))
other = list(csv.DictReader(open(sys.argv[2])))
table = {}
for line in open(sys.argv[3]):
    f = line.split()
    if f and f[0].isdigit():
        table[int(f[0])] = (int(f[1]), int(f[2]), float(f[3]))
assert len(rows) == 6, len(rows)
assert sorted(table) == [300, 600], table
for t, (avg_tokens, trials, acc) in table.items():
    mine = [r for r in rows if int(r["target_tokens"]) == t]
    assert len(mine) == trials == 3
    assert [int(r["trial"]) for r in mine] == [0, 1, 2]
    assert abs(acc - sum(int(r["correct"]) for r in mine) / 3) < 1e-9, (t, acc)
    assert avg_tokens == sum(int(r["prompt_tokens"]) for r in mine) // 3
    for r in mine:
        n = int(r["n_garbage"])
        assert n == int(3.75 * t // 1024 * 1024), (n, t)
        assert 0 <= int(r["depth_chars"]) < n and 1 <= int(r["key"]) < 50000
        # right when the first run of digits in the decoded continuation is the key
        first = re.search(r"[0-9]+", r["model_answer"])
        assert int(r["correct"]) == (first is not None and first.group(0) == r["answer"]), r
# trial j uses seed + j at every length (as LongLoRA seeds trial j with j): same keys across lengths
assert [r["key"] for r in rows[:3]] == [r["key"] for r in rows[3:]]
assert [r["key"] for r in rows] != [r["key"] for r in other], "seed 12 drew seed 11's keys"
EOF

# 5. export from the command line: shards + index, config, tokenizer copied; its perplexity
#    (bf16 weights) is the applied adapter's within bf16 rounding (2e-2 relative)
mkdir -p "$TMP/base" && cp tests/fixtures/infer/base/* "$TMP/base/" && cp "$TOK" "$TMP/base/"
raw_ids "$TMP/small.bin" 2 400 120
$BIN --model "$TMP/base" --adapter tests/fixtures/infer/adapter --ctx 64 --export "$TMP/exp" --shard-size 20000 2>"$TMP/err" \
  || bad "export failed: $(cat "$TMP/err")"
[ -f "$TMP/exp/model.safetensors.index.json" ] && [ -f "$TMP/exp/model-00001-of-00003.safetensors" ] && ok || bad "export is not sharded: $(ls "$TMP/exp")"
cmp -s "$TOK" "$TMP/exp/tokenizer.model" && ok || bad "tokenizer.model was not copied"
# the base's max_position_embeddings (32) and the factor: the context is 32 x 2, as LongLoRA saves its models
grep -q '"max_position_embeddings": 32' "$TMP/exp/config.json" && grep -q '"factor": 2' "$TMP/exp/config.json" && ok \
  || bad "config.json: $(cat "$TMP/exp/config.json")"
a=$($BIN --model "$TMP/base" --adapter tests/fixtures/infer/adapter --ctx 64 --ppl "$TMP/small.bin" --seq-len 64 --stride 32 2>/dev/null | awk '$1 == 64 {print $4}')
b=$($BIN --model "$TMP/exp" --ppl "$TMP/small.bin" --seq-len 64 --stride 32 2>"$TMP/err" | awk '$1 == 64 {print $4}')
grep -q "context 64 (RoPE linear factor 2)" "$TMP/err" && ok || bad "the export reloaded without --ctx: $(cat "$TMP/err")"
"$PY" -c "import sys; a, b = float('$a'), float('$b'); sys.exit(0 if abs(a - b) <= 2e-2 * a else 1)" && ok \
  || bad "perplexity of the export $b, of base + adapter $a"

checks_summary test_infer_cli
