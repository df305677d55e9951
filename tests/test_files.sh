#!/usr/bin/env bash
# tests/test_files.sh: nothing the user has is lost or silently mixed (issue 15's reproducers,
# on the tiny fixture model M = tests/fixtures/train/model and an adapter A trained on it).
#  1. a re-export into an old export folder is refused (a stale sharded index would win over
#     the new weights); --overwrite replaces the old export whole, and the result equals a
#     fresh export;
#  2. an output that is an input (the same file, a hard link, a symlink) or lies inside an
#     input folder is refused and the input is unchanged: 06 --export, 01 --out,
#     05 --save-tokens, 05 --out;
#  3. --out holds one run: a different run into it is refused (the folder unchanged), --resume
#     continues it with one contiguous log, --overwrite starts over with nothing left of the old
#     run, and a second run while the first lives is refused naming its pid;
#  4. temporaries that killed runs left in --out are removed at the next start (only those
#     whose pid is dead);
#  5. a FIFO or a folder given as an input file ends with one sentence (never a hang, never
#     "out of memory");
#  6. a config that disagrees with its weights (num_hidden_layers 1e6) is refused before any
#     allocation, a size past the limit says so, a tokenizer.json that is not JSON is called
#     that, a long path keeps the error's cause, and a checkpoint whose bytes changed (finite
#     garbage or NaN) is refused by its checksum and never called "the last good checkpoint".
# Each part exits 1 with one sentence where the old code exited 0, hung or ran out of memory.
cd "$(dirname "$0")/.." || exit 1
make -s 01_tokenize 02_model 06_infer 05_train >/dev/null || { echo "cannot build the stages"; exit 1; }
PY=${PYTHON:-python3}
"$PY" -c "import json, struct" 2>/dev/null || { echo "skip: no working Python at $PY"; exit 77; }
mkdir -p build
T=$(mktemp -d "$PWD/build/test_files_XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT
export OMP_NUM_THREADS=1
M=tests/fixtures/train/model
D=tests/fixtures/train/data.tok
. tests/check.sh
sum() { cksum "$@" 2>/dev/null | awk '{print $1 $2}' | tr -d '\n'; }
TRAIN=(./05_train --model "$M" --ctx 32 --device cpu --quiet --warmup 0 --lr 1e-2)

# a tiny byte-level BPE tokenizer.json (7 ids) for the text inputs
TOK="$T/tok"
mkdir -p "$TOK"
printf '{"model": {"type": "BPE", "vocab": {"h": 0, "e": 1, "l": 2, "o": 3, "s": 4, "\u010a": 5, "\u0120": 6}, "merges": []}, %s}\n' \
  '"pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": false, "use_regex": true}, "decoder": {"type": "ByteLevel"}' >"$TOK/tokenizer.json"
# the adapter A
"${TRAIN[@]}" --data "$D" --max-steps 2 --out "$T/A" >"$T/a.log" 2>&1 || { echo "training the adapter failed"; cat "$T/a.log"; exit 1; }

# ---- 1. re-export into an old export folder -------------------------------------------------
./06_infer --model "$M" --export "$T/X" --shard-size 1 >/dev/null 2>&1
check "a sharded export of the base writes an index" '[ -f "$T/X/model.safetensors.index.json" ]'
before=$(sum "$T"/X/*)
refused "re-export into the old export folder" "not empty" ./06_infer --model "$M" --adapter "$T/A" --export "$T/X"
check "the refused re-export left the old folder as it was" '[ "$(sum "$T"/X/*)" = "$before" ]'
./06_infer --model "$M" --adapter "$T/A" --export "$T/X" --overwrite >/dev/null 2>&1
./06_infer --model "$M" --adapter "$T/A" --export "$T/Y" >/dev/null 2>&1
check "--overwrite replaces the old export whole (no stale index or shards)" \
  '[ ! -e "$T/X/model.safetensors.index.json" ] && ! ls "$T"/X/model-0* >/dev/null 2>&1 && cmp -s "$T/X/model.safetensors" "$T/Y/model.safetensors"'
lx=$(./02_model --model "$T/X" --tokens "$D" --ctx 32 2>/dev/null | tail -1)
lb=$(./02_model --model "$M" --tokens "$D" --ctx 32 2>/dev/null | tail -1)
check "the re-exported model is base + adapter, not the base ($lx vs $lb)" '[ -n "$lx" ] && [ "$lx" != "$lb" ]'
check "no temporary export folder is left beside it" '! ls -a "$T" | grep -q "\.X\.\(tmp\|old\)\."'
echo junk >"$T/X/notes.txt"
refused "--overwrite keeps a folder that holds more than an export" "does not write" ./06_infer --model "$M" --export "$T/X" --overwrite

# ---- 2. an output that is an input -----------------------------------------------------------
cp -r "$M" "$T/Mc"
before=$(sum "$T"/Mc/*)
refused "06 --export onto the base model's folder" "is the input --model" ./06_infer --model "$T/Mc" --adapter "$T/A" --export "$T/Mc"
refused "06 --export inside the base model's folder" "inside the input folder --model" ./06_infer --model "$T/Mc" --export "$T/Mc/merged"
ln -s "$T/Mc" "$T/Mlink"
refused "06 --export onto a symlink to the base" "is the input --model" ./06_infer --model "$T/Mc" --export "$T/Mlink"
check "the base model is unchanged" '[ "$(sum "$T"/Mc/*)" = "$before" ]'
for _ in $(seq 12); do printf 'hello shell sees lol\n'; done >"$T/t.txt"
before=$(sum "$T/t.txt")
refused "01 --out onto --encode-file" "is the input --encode-file" ./01_tokenize --tokenizer "$TOK" --encode-file "$T/t.txt" --out "$T/t.txt"
ln "$T/t.txt" "$T/t_hard.txt"
refused "01 --out onto a hard link of --encode-file" "is the input --encode-file" ./01_tokenize --tokenizer "$TOK" --encode-file "$T/t.txt" --out "$T/t_hard.txt"
refused "05 --save-tokens onto --data" "is the input --data" "${TRAIN[@]}" --tokenizer "$TOK" --data "$T/t.txt" --save-tokens "$T/t.txt" --out "$T/o_st"
check "the text is unchanged" '[ "$(sum "$T/t.txt")" = "$before" ]'
refused "05 --out inside the model folder" "inside the input folder --model" "${TRAIN[@]}" --data "$D" --out "$M/run"
check "nothing was created inside the model folder" '[ ! -e "$M/run" ]'

# ---- 3. a reused or shared --out ---------------------------------------------------------------
"${TRAIN[@]}" --data "$D" --max-steps 4 --save-every 1 --out "$T/R" >"$T/r1.log" 2>&1
before=$(cd "$T/R" && find . -type f ! -name .lock | sort | xargs cksum | tr -d '\n')
refused "a different run into a used --out" "holds another run" "${TRAIN[@]}" --data "$D" --lr 3e-3 --max-steps 2 --save-every 1 --out "$T/R"
refused "the same run again into its --out (without --resume)" "already holds this run" "${TRAIN[@]}" --data "$D" --max-steps 2 --out "$T/R"
check "the refused runs changed nothing in --out" '[ "$(cd "$T/R" && find . -type f ! -name .lock | sort | xargs cksum | tr -d "\n")" = "$before" ]'
"${TRAIN[@]}" --data "$D" --max-steps 6 --out "$T/R" --resume "$T/R" >"$T/r2.log" 2>&1
check "--resume continues it: train_log.csv holds steps 1-6 once each" '[ "$(cut -d, -f1 "$T/R/train_log.csv" | tail -n +2 | tr "\n" " ")" = "1 2 3 4 5 6 " ]'
"${TRAIN[@]}" --data "$D" --lr 3e-3 --max-steps 2 --save-every 1 --out "$T/R" --overwrite >"$T/r3.log" 2>&1
check "--overwrite starts over: log steps 1-2, checkpoints 1-2 only" \
  '[ "$(cut -d, -f1 "$T/R/train_log.csv" | tail -n +2 | tr "\n" " ")" = "1 2 " ] && [ "$(ls -d "$T"/R/checkpoint-* | wc -l)" = 2 ] && grep -q "lr 0.003" "$T/R/run.json"'
"${TRAIN[@]}" --data "$D" --max-steps 1000000 --out "$T/S" >"$T/s1.log" 2>&1 &
p1=$!
for _ in $(seq 200); do [ -s "$T/S/train_log.csv" ] && break; sleep 0.05; done
refused "a second run into a --out a live run holds" "another run (pid $p1)" "${TRAIN[@]}" --data "$D" --max-steps 2 --out "$T/S"
kill -INT $p1; wait $p1
check "the first run went on undisturbed (it stopped on SIGINT with a checkpoint)" 'grep -q "interrupted by signal" "$T/s1.log"'

# ---- 4. temporaries of killed runs -------------------------------------------------------------
mkdir -p "$T/R/.checkpoint-9.tmp.4999999" "$T/R/.checkpoint-7.tmp.$$"
echo x >"$T/R/.checkpoint-9.tmp.4999999/train_state.safetensors"
echo x >"$T/R/adapter_model.safetensors.tmp.4999999"
"${TRAIN[@]}" --data "$D" --lr 3e-3 --max-steps 3 --save-every 1 --out "$T/R" --resume "$T/R" >"$T/r4.log" 2>&1
check "a dead run's .checkpoint-9.tmp.<pid>/ and adapter .tmp.<pid> are removed at start" \
  '[ ! -e "$T/R/.checkpoint-9.tmp.4999999" ] && [ ! -e "$T/R/adapter_model.safetensors.tmp.4999999" ] && grep -q "removed 2 temporary" "$T/r4.log"'
check "a live process's temporary folder is kept" '[ -d "$T/R/.checkpoint-7.tmp.$$" ]'
rm -rf "$T/R/.checkpoint-7.tmp.$$"

# ---- 5. FIFOs and folders as input files ---------------------------------------------------------
mkfifo "$T/fifo"
refused "05 --data FIFO" "is a FIFO" "${TRAIN[@]}" --data "$T/fifo" --out "$T/o5"
refused "05 --tokenizer FIFO" "is a FIFO" "${TRAIN[@]}" --tokenizer "$T/fifo" --data "$D" --out "$T/o6"
refused "01 --tokenizer FIFO" "is a FIFO" ./01_tokenize --tokenizer "$T/fifo" hello
refused "01 --encode-file FIFO" "is a FIFO" ./01_tokenize --tokenizer "$TOK" --encode-file "$T/fifo" --out "$T/f.tok"
refused "06 --ppl FIFO" "is a FIFO" ./06_infer --model "$M" --ppl "$T/fifo"
mkdir -p "$T/adir"
refused "05 --data a folder" "is a directory" "${TRAIN[@]}" --data "$T/adir" --out "$T/o7"
refused "06 --ppl a folder" "is a directory" ./06_infer --model "$M" --ppl "$T/adir"

# ---- 6. smaller ones -----------------------------------------------------------------------------
edit_config() {  # edit_config DIR KEY VALUE: a copy of M with one config value changed
  cp -r "$M" "$1"
  "$PY" - "$1/config.json" "$2" "$3" <<'EOF'
import json, sys
c = json.load(open(sys.argv[1])); c[sys.argv[2]] = json.loads(sys.argv[3]); json.dump(c, open(sys.argv[1], "w"))
EOF
}
edit_config "$T/M_layers" num_hidden_layers 1000000
refused "num_hidden_layers 1e6 with 2 layers of weights (4 GiB address space)" "the config and the weights disagree" \
  bash -c "ulimit -v 4000000; exec ./02_model --model '$T/M_layers' --tokens '$D' --ctx 32"
edit_config "$T/M_big" hidden_size 1099511627776
refused "hidden_size 2^40" "hidden_size\" is 1099511627776, larger than" ./02_model --model "$T/M_big" --tokens "$D" --ctx 32
mkdir -p "$T/tokj" && printf '{"version": "1.0", "model": {' >"$T/tokj/tokenizer.json"
refused "a tokenizer.json that is not JSON" "tokenizer.json is not a valid tokenizer.json: malformed JSON" ./01_tokenize --tokenizer "$T/tokj/tokenizer.json" hello
long="$T"
for i in $(seq 6); do long="$long/$(printf 'd%.0s' $(seq 200))"; done
mkdir -p "$long"
refused "a missing file under a 1200-byte path keeps its cause" "config.json: No such file or directory" ./02_model --model "$long" --tokens "$D"

# checkpoints: finite garbage and NaN written into one are refused by the checksum
"${TRAIN[@]}" --data "$D" --max-steps 4 --save-every 2 --out "$T/C" >"$T/c1.log" 2>&1
"$PY" - "$T/C/checkpoint-2/train_state.safetensors" "$T/C/checkpoint-4/train_state.safetensors" <<'EOF'
import json, struct, sys
for path, value in zip(sys.argv[1:], [0.25, float("nan")]):
    raw = bytearray(open(path, "rb").read())
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    name = next(k for k, v in head.items() if k != "__metadata__" and v["dtype"] == "F32" and not k.endswith("exp_avg_sq"))
    at = 8 + n + head[name]["data_offsets"][0]
    raw[at:at + 4] = struct.pack("<f", value)
    open(path, "wb").write(raw)
EOF
refused "a checkpoint with a finite value changed" "checkpoint-2 is damaged: train_state.safetensors does not match the checksum" \
  "${TRAIN[@]}" --data "$D" --max-steps 6 --out "$T/C" --resume "$T/C/checkpoint-2"
refused "a NaN-corrupted checkpoint" "checkpoint-4 is damaged" "${TRAIN[@]}" --data "$D" --max-steps 6 --out "$T/C" --resume "$T/C"
check "the NaN-corrupted checkpoint is not called the last good checkpoint" '! grep -q "last good checkpoint" <<<"$CHECK_ERR"'

checks_summary test_files
