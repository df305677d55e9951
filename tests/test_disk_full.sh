#!/usr/bin/env bash
# tests/test_disk_full.sh: a full disk during the final save or an export loses nothing and
# leaves nothing half-written. A small tmpfs (mounted here; this needs root) is sized from a
# run on the ordinary disk so that exactly the last write does not fit:
#   1. 05_train: the final checkpoint fits, the adapter into --out does not: exit 1 with one
#      sentence naming ENOSPC, no adapter file in --out, no temporaries; once the disk has
#      room, --resume writes the adapter, byte-identical to the run on the ordinary disk;
#   2. 06_infer --export into a new folder: exit 1, no folder, no temporaries;
#   3. 06_infer --export --overwrite over a previous export when the new one does not fit
#      beside it: exit 1, the previous export is unchanged.
cd "$(dirname "$0")/.." || exit 1
make -s 05_train 06_infer >/dev/null || { echo "cannot build 05_train and 06_infer"; exit 1; }
mkdir -p build
T=$(mktemp -d "$PWD/build/test_disk_full_XXXXXX") || exit 1
MNT="$T/mnt"
mkdir -p "$MNT"
cleanup() { umount "$MNT" 2>/dev/null; rm -rf "$T"; }
trap cleanup EXIT
if ! mount -t tmpfs -o size=64k tmpfs "$MNT" 2>"$T/mount.log"; then
  echo "skip: cannot mount a small tmpfs to fill ($(head -1 "$T/mount.log"); this test needs root)"; exit 77
fi
export OMP_NUM_THREADS=1
M=tests/fixtures/train/model
RUN=(./05_train --model "$M" --data tests/fixtures/train/data.tok --ctx 32 --device cpu --quiet --warmup 0 --lr 1e-2 --max-steps 3)
. tests/check.sh
kib() { du -sk "$@" | awk '{s += $1} END {print s}'; }  # blocks used, as tmpfs counts them
resize() { mount -o remount,size="$1"k "$MNT"; }

# 1. the final adapter
"${RUN[@]}" --out "$T/ref" >/dev/null 2>&1 || { echo "FAIL: the run on the ordinary disk failed"; exit 1; }
all=$(kib "$T/ref")
adapter=$(kib "$T/ref/adapter_config.json" "$T/ref/adapter_model.safetensors")
resize $((all - adapter / 2))
"${RUN[@]}" --out "$MNT/out" >"$T/full.log" 2>&1
rc=$?
check "05_train on a full disk exits 1 with one sentence ($(grep '^error' "$T/full.log" | cut -c1-120)...)" \
  '[ $rc -eq 1 ] && [ "$(grep -c "^error: " "$T/full.log")" = 1 ] && grep -q "No space left on device" "$T/full.log"'
check "the final checkpoint is there whole" '[ -f "$MNT/out/checkpoint-3/trainer_state.json" ]'
check "no adapter file in --out (not half of one)" '[ ! -e "$MNT/out/adapter_config.json" ] && [ ! -e "$MNT/out/adapter_model.safetensors" ]'
check "no temporaries left" '! ls -a "$MNT/out" | grep -qE "\.(tmp|old)\."'
resize $((all * 2))
"${RUN[@]}" --out "$MNT/out" --resume "$MNT/out" >"$T/resume.log" 2>&1
check "with room again, --resume writes the adapter, byte-identical to the run on the ordinary disk" \
  'cmp -s "$MNT/out/adapter_model.safetensors" "$T/ref/adapter_model.safetensors" && cmp -s "$MNT/out/adapter_config.json" "$T/ref/adapter_config.json"'
rm -rf "$MNT/out"

# 2. an export into a new folder
./06_infer --model "$M" --adapter "$T/ref" --export "$T/exp" >/dev/null 2>&1 || { echo "FAIL: the export on the ordinary disk failed"; exit 1; }
exp=$(kib "$T/exp")
resize $((exp / 2))
./06_infer --model "$M" --adapter "$T/ref" --export "$MNT/X" >"$T/exp.log" 2>&1
rc=$?
check "an export on a full disk exits 1 with one sentence ($(grep '^error' "$T/exp.log" | cut -c1-120)...)" \
  '[ $rc -eq 1 ] && [ "$(grep -c "^error: " "$T/exp.log")" = 1 ] && grep -q "No space left on device" "$T/exp.log"'
check "no export folder (not one with only config.json) and no temporaries" '[ -z "$(ls -A "$MNT")" ]'

# 3. --overwrite over a previous export that the new one does not fit beside
resize $((exp * 3 / 2))
./06_infer --model "$M" --export "$MNT/X" >/dev/null 2>&1
before=$(cd "$MNT/X" && cksum * | tr -d '\n')
./06_infer --model "$M" --adapter "$T/ref" --export "$MNT/X" --overwrite >"$T/exp2.log" 2>&1
rc=$?
check "a re-export on a full disk exits 1 with one sentence" '[ $rc -eq 1 ] && grep -q "No space left on device" "$T/exp2.log"'
check "the previous export is unchanged and nothing else is left" \
  '[ "$(cd "$MNT/X" && cksum * | tr -d "\n")" = "$before" ] && [ "$(ls -A "$MNT")" = X ]'

checks_summary test_disk_full
