#!/usr/bin/env bash
# The attention kernels' checks before any timing (make bench, bench/attn_sm80.sh):
#   bash bench/attn_check.sh TEST_BINARY LOG
# runs a build of tests/test_gpu_attention (every tile variant against the fp64 criterion on
# odd N, GQA and S2, outputs poisoned), its output into LOG; prints its last line and exits 0
# if it passed, else one sentence and exit 1 (no GPU: the test's own reason).
set -u
test_bin=$1 log=$2
rc=0
"$test_bin" > "$log" 2>&1 || rc=$?
if [ $rc -eq 77 ]; then echo "attention benchmark: $(tail -1 "$log")" >&2; exit 1; fi
if [ $rc -ne 0 ]; then
    tail -20 "$log"
    echo "attention benchmark: the kernels failed their checks ($log); nothing was timed" >&2
    exit 1
fi
tail -1 "$log"
