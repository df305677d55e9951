#!/usr/bin/env bash
# tests/test_kill_save.sh: a kill -9 anywhere in the final save leaves no half adapter, and
# the run finishes to the same adapter as a run never killed.
# tests/crash_at.c (LD_PRELOAD) kills 05_train with SIGKILL just before its k-th call that
# changes a file (fopen for writing, rename, mkdir, rmdir, unlink, remove, fsync). A first run
# lists those calls; the final save (the last checkpoint, then the adapter into --out) is the
# tail of the list from the checkpoint's temporary folder on. 40 runs are killed at 40 points
# of that tail (every call at least once), and 40 more at points spread over a whole run that
# checkpoints every step (run.json, the log, every checkpoint, the final save); after each:
#   1. --out shows the adapter whole or not at all: adapter_config.json only beside its
#      adapter_model.safetensors, and the pair loads (03_lora --load-adapter);
#   2. a checkpoint folder is there whole or not at all (the resume below verifies its checksums);
#   3. the run continues (--resume when a checkpoint is there, which only writes the adapter
#      when the checkpoint is of the last step; else from the start), removes the killed run's
#      temporaries, and writes the adapter byte for byte as the unkilled run's (a kill after
#      the adapter was in place leaves it so already).
cd "$(dirname "$0")/.." || exit 1
make -s 05_train 03_lora >/dev/null || { echo "cannot build 05_train and 03_lora"; exit 1; }
mkdir -p build
T=$(mktemp -d "$PWD/build/test_kill_save_XXXXXX") || exit 1
trap 'rm -rf "$T"' EXIT
if ! cc -shared -fPIC -O1 -o "$T/crash_at.so" tests/crash_at.c -ldl 2>"$T/cc.log"; then
  echo "skip: cannot build the LD_PRELOAD library tests/crash_at.c ($(head -1 "$T/cc.log"))"; exit 77
fi
export OMP_NUM_THREADS=1
M=tests/fixtures/train/model
RUN=(./05_train --model "$M" --data tests/fixtures/train/data.tok --ctx 32 --device cpu --quiet --warmup 0 --lr 1e-2 --max-steps 3)
KILLS=${KILLS:-40}

"${RUN[@]}" --out "$T/ref" >"$T/ref.log" 2>&1 || { echo "FAIL: the reference run failed"; cat "$T/ref.log"; exit 1; }
fails=0; half=0

# kill_loop LABEL FIRST_PATTERN FLAGS...: lists the calls of a run with FLAGS, then kills KILLS
# runs at points spread over the calls from the first that matches FIRST_PATTERN to the end
kill_loop() {
  local label=$1 pattern=$2; shift 2
  local run=("${RUN[@]}" "$@") calls="$T/calls.$label" landed=0
  rm -rf "$T/count"
  CRASH_LOG="$calls" LD_PRELOAD="$T/crash_at.so" "${run[@]}" --out "$T/count" >/dev/null 2>&1 || { echo "FAIL: the counting run failed"; fails=$((fails + 1)); return; }
  local total first span
  total=$(wc -l <"$calls")
  first=$(grep -n -- "$pattern" "$calls" | head -1 | cut -d: -f1)
  if [ -z "$first" ] || [ "$total" -le "$first" ]; then echo "FAIL: cannot find '$pattern' in the call list"; fails=$((fails + 1)); return; fi
  span=$((total - first + 1))
  echo "$label: calls $first..$total of $total; $KILLS kills over them"
  for ((i = 0; i < KILLS; i++)); do
    local k=$((first + (span >= KILLS ? i * span / KILLS : i % span)))
    local O="$T/run$i"
    rm -rf "$O"
    { CRASH_AT=$k LD_PRELOAD="$T/crash_at.so" "${run[@]}" --out "$O" >"$T/kill$i.log" 2>&1; } 2>/dev/null
    [ $? -eq 137 ] && landed=$((landed + 1))
    local what="$label kill $((i + 1)) (before call $k: $(sed -n "${k}p" "$calls" | cut -d' ' -f2- | sed "s|$T/count/||"))"
    # 1. the adapter in --out: whole or absent
    if [ -e "$O/adapter_config.json" ]; then
      if [ ! -e "$O/adapter_model.safetensors" ] || ! ./03_lora --model "$M" --load-adapter "$O" --steps 0 >"$T/load$i.log" 2>&1; then
        echo "FAIL $what: a half adapter in --out"; ls -la "$O"; half=$((half + 1)); fails=$((fails + 1)); continue
      fi
    fi
    # 2 and 3. finish the run (unless the kill came after the adapter was in place), then compare
    if [ -e "$O/adapter_config.json" ]; then echo done >"$T/fix$i.log"
    elif ls -d "$O"/checkpoint-* >/dev/null 2>&1; then "${run[@]}" --out "$O" --resume "$O" >"$T/fix$i.log" 2>&1
    else "${run[@]}" --out "$O" >"$T/fix$i.log" 2>&1; fi
    local rc=$?
    if [ $rc -ne 0 ]; then echo "FAIL $what: continuing exits $rc: $(tail -1 "$T/fix$i.log")"; fails=$((fails + 1)); continue; fi
    if ! cmp -s "$O/adapter_model.safetensors" "$T/ref/adapter_model.safetensors" || ! cmp -s "$O/adapter_config.json" "$T/ref/adapter_config.json"; then
      echo "FAIL $what: the finished adapter differs from the unkilled run's"; fails=$((fails + 1)); continue
    fi
    if ! grep -q done "$T/fix$i.log" && ls -a "$O" | grep -qE '\.(tmp|old)\.[0-9]+$'; then
      echo "FAIL $what: temporaries left: $(ls -a "$O" | grep -E '\.(tmp|old)\.')"; fails=$((fails + 1)); continue
    fi
    local how
    how=$(grep -q done "$T/fix$i.log" && echo "already whole" || { grep -q resumed "$T/fix$i.log" && echo "resumed" || echo "restarted"; })
    echo "ok   $what: $how, adapter identical to the unkilled run's"
    rm -rf "$O"
  done
  [ "$landed" -eq "$KILLS" ] || { echo "FAIL: only $landed of $KILLS $label runs were killed (the others ended on their own)"; fails=$((fails + 1)); }
}

kill_loop "final save" '\.checkpoint-3\.tmp\.'
kill_loop "whole run, a checkpoint every step" 'run.json' --save-every 1
echo "test_kill_save: $((2 * KILLS)) kill -9 ($KILLS during the final save, $KILLS over a whole run), $half half adapters, $fails failures"
[ $fails -eq 0 ]
