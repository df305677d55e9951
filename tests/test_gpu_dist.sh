#!/usr/bin/env bash
# Data-parallel training over NCCL (05_dist.c, 05_train_gpu.c), where the build has NCCL and
# the machine a GPU; skipped elsewhere.
# A random SmolLM2-135M shape (head_dim 64, GQA, tied head) at N=256 with S2-Attn, 3 steps,
# against one GPU with --grad-accum 2 and no communicator:
#   1. one rank over NCCL (--world-size 1 --dist-file: a communicator of one, so every
#      collective of the step runs: all-reduce, ZeRO-1 slices, the final gathers) and the
#      same with --shard-weights (the ZeRO-3 gather per layer, double-buffered) give the same
#      losses, norms and adapter; this part runs on a machine of one GPU;
#   2. with 2 or more GPUs: K=2 x --grad-accum 1, plain and --shard-weights, give the same
#      again (the gathered bf16 weights are the same bits); rank 1 prints no step lines;
#      the K=2 checkpoint resumes on one GPU.
# Tolerance: bf16 compute, the same micro-batches; only the order of the fp32 gradient sums
# differs, so we allow 1e-4 relative on the losses, 1e-3 on the norms and
# |a-b| <= 1e-5 + 1e-3 |b| on the adapter after 3 AdamW steps.
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
n_gpu=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
if [ "${n_gpu:-0}" -lt 1 ]; then echo "skip: needs a GPU (found none)"; exit 77; fi
if ! "$PY" -c "import numpy" 2>/dev/null; then echo "skip: numpy is not installed for $PY"; exit 77; fi
make -s 05_train >/dev/null || { echo "FAIL: cannot build 05_train"; exit 1; }
make -s found 2>/dev/null | grep -q "nccl=yes" || { echo "skip: this build has no NCCL"; exit 77; }
mkdir -p build
T=$(mktemp -d build/test_gpu_dist_XXXXXX) || exit 1
. tests/check.sh
SEED=$RANDOM
"$PY" - "$T/d.tok" "$SEED" <<'EOF'
import random, struct, sys
r = random.Random(int(sys.argv[2]))
ids = [r.randrange(49152) for _ in range(256 * 8 + 1)]
open(sys.argv[1], "wb").write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack("<%dH" % len(ids), *ids))
EOF
COMMON=(--init random --shape smollm2-135m --data "$T/d.tok" --ctx 256 --max-steps 3 --lr 1e-3 --warmup 0 --device gpu --seed "$SEED")
two() {  # OUT [flags]
  local OUT=$1; shift
  timeout 300 ./05_train "${COMMON[@]}" --grad-accum 1 --out "$OUT" --world-size 2 --rank 1 --dist-file "$OUT.id" "$@" >"$OUT.rank1.log" 2>&1 &
  local p=$!
  timeout 300 ./05_train "${COMMON[@]}" --grad-accum 1 --out "$OUT" --world-size 2 --rank 0 --dist-file "$OUT.id" "$@" >"$OUT.rank0.log" 2>&1
  local rc=$?
  wait $p || rc=$?
  return $rc
}
one_rank() {  # OUT [flags]: one process, a communicator of one rank
  local OUT=$1; shift
  timeout 300 ./05_train "${COMMON[@]}" --grad-accum 2 --out "$OUT" --world-size 1 --dist-file "$OUT.id" "$@" >"$OUT.log" 2>&1
}
check "one GPU, --grad-accum 2" 'timeout 300 ./05_train "${COMMON[@]}" --grad-accum 2 --out "$T/one" >"$T/one.log" 2>&1'
check "one rank over NCCL" 'one_rank "$T/nccl1"'
check "one rank over NCCL says so" 'grep -q "^ranks: 1 (NCCL)" "$T/nccl1.log"'
check "one rank over NCCL, --shard-weights" 'one_rank "$T/z3one" --shard-weights'
runs="nccl1 z3one"
if [ "$n_gpu" -ge 2 ]; then
  check "two GPUs" 'two "$T/two"'
  check "two GPUs, --shard-weights" 'two "$T/z3" --shard-weights'
  check "rank 1 prints no step lines" '! grep -q "^step" "$T/two.rank1.log"'
  runs="$runs two z3"
else
  echo "note: one GPU here, so the K=2 runs (plain, --shard-weights, resume) are not run"
fi
"$PY" - "$T" $runs <<'EOF' || bad "the runs against one GPU (above)"
import json, struct, sys
import numpy as np
T, runs = sys.argv[1], sys.argv[2:]
def st(path):
    raw = open(path, "rb").read(); n = struct.unpack("<Q", raw[:8])[0]; head = json.loads(raw[8:8 + n])
    return {k: np.frombuffer(raw[8 + n + v["data_offsets"][0]: 8 + n + v["data_offsets"][1]], dtype=np.float32)
            for k, v in head.items() if k != "__metadata__" and v["dtype"] == "F32"}
def log(path):
    return {int(r[0]): (float(r[1]), float(r[3])) for r in (l.split(",") for l in open(path).read().strip().split("\n")[1:])}
bad = 0
ref, ref_ad = log(T + "/one/train_log.csv"), st(T + "/one/adapter_model.safetensors")
for name in runs:
    L = log(T + "/" + name + "/train_log.csv")
    wl = max(abs(L[s][0] - ref[s][0]) / abs(ref[s][0]) for s in ref)
    wn = max(abs(L[s][1] - ref[s][1]) / max(abs(ref[s][1]), 1e-12) for s in ref)
    ok = sorted(L) == sorted(ref) and wl <= 1e-4 and wn <= 1e-3
    print(("ok   " if ok else "FAIL ") + "%s: losses and norms match one GPU with accumulation 2 (worst relative %.2e, %.2e)" % (name, wl, wn)); bad += not ok
    ad = st(T + "/" + name + "/adapter_model.safetensors")
    worst = max(float(np.max(np.abs(ad[k] - ref_ad[k]) / (1e-5 + 1e-3 * np.abs(ref_ad[k])))) for k in ref_ad)
    ok = sorted(ad) == sorted(ref_ad) and worst <= 1
    print(("ok   " if ok else "FAIL ") + "%s: adapter matches (worst |a-b| / (1e-5 + 1e-3|b|) = %.3f)" % (name, worst)); bad += not ok
sys.exit(1 if bad else 0)
EOF
if [ "$n_gpu" -ge 2 ]; then
  check "K=2's checkpoint resumes on one GPU (--grad-accum 2)" 'timeout 300 ./05_train "${COMMON[@]}" --grad-accum 2 --max-steps 4 --out "$T/two" --resume "$T/two" >"$T/resume.log" 2>&1 && grep -q "^step 4/4" "$T/resume.log"'
fi
[ $fails -eq 0 ] && { echo "test_gpu_dist: $runs match one GPU with accumulation 2 (seed $SEED)"; rm -rf "$T"; exit 0; }
echo "test_gpu_dist: FAILED (seed $SEED; logs in $T)"
exit 1
