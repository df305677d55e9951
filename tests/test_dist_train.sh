#!/usr/bin/env bash
# Data-parallel training on the CPU (05_dist.c's shared-file backend), checked against one
# process with K times the gradient accumulation: the issue's equivalence check.
#
# A tiny random model (--shape tiny, N=64, S2-Attn) on a fresh random token stream. The
# reference is one process with --grad-accum 6 for 4 steps (a checkpoint at step 2). Checks:
#   1. K=2 x accum 3, K=3 x accum 2 and one rank with a communicator of its own
#      (--world-size 1 --dist-file: every collective runs, over one rank) give the reference's loss and gradient norm at every
#      step, and its final adapter, fp32 masters and AdamW moments (the moments are ZeRO-1
#      shards gathered for the checkpoint), within the tolerance below;
#   2. the checkpoint K=2 wrote at step 2 resumes with K=1 (accum 6) and K=3 (accum 2), and
#      steps 3-4 and the final adapter match the reference's;
#   3. logs and checkpoints come from rank 0 only (the other ranks print no step lines);
#   4. a rank that fails (its --out is a file) stops the others with one sentence naming it,
#      and a rank killed with SIGKILL stops the others too (no hang);
#   5. ranks taken from Open MPI's environment (as mpirun starts them) run the same as flags;
#   6. a mismatched checkpoint (global accumulation 4 instead of 6) is refused with a sentence;
#   7. flags a user can get wrong (no --dist-file, a rank outside the world, a stale file,
#      --shard-weights on the CPU) end with one sentence.
# Tolerance: fp32 throughout; the only difference is the order of the gradient sums (per rank,
# then across ranks), so values agree to ~1e-7 relative. We allow |a-b| <= 1e-6 + 1e-5 |b| for
# the tensors and 1e-5 relative for the losses (1e-4 for the gradient norms).
set -u
cd "$(dirname "$0")/.." || exit 1
PY=${PYTHON:-python3}
if ! "$PY" -c "import array, json, struct" 2>/dev/null; then
  echo "skip: no working Python at $PY"
  exit 77
fi
make -s 05_train >/dev/null || { echo "FAIL: cannot build 05_train"; exit 1; }
mkdir -p build
T=$(mktemp -d build/test_dist_train_XXXXXX) || exit 1
trap 'rm -rf "$T"' EXIT
. tests/check.sh

SEED=$RANDOM
"$PY" - "$T/d.tok" "$SEED" <<'EOF'
import random, struct, sys
r = random.Random(int(sys.argv[2]))
ids = [r.randrange(256) if r.random() < 0.3 else (i * 7) % 256 for i in range(2600)]
open(sys.argv[1], "wb").write(b"LLTK" + struct.pack("<IIQ", 1, 2, len(ids)) + struct.pack("<%dH" % len(ids), *ids))
EOF
COMMON=(--init random --shape tiny --data "$T/d.tok" --ctx 64 --lr 1e-3 --warmup 1 --device cpu --seed "$SEED" --save-every 2)

# run K ACCUM OUT [extra flags]: K ranks (background, rank 0 last in the foreground), logs in OUT.rank<r>.log
run() {
  local K=$1 A=$2 OUT=$3; shift 3
  local pids=()
  for ((r = 1; r < K; r++)); do
    ./05_train "${COMMON[@]}" --grad-accum "$A" --out "$OUT" --world-size "$K" --rank "$r" --dist-file "$OUT.dist" "$@" >"$OUT.rank$r.log" 2>&1 &
    pids+=($!)
  done
  local rc=0
  if [ "$K" -gt 1 ]; then
    timeout 120 ./05_train "${COMMON[@]}" --grad-accum "$A" --out "$OUT" --world-size "$K" --rank 0 --dist-file "$OUT.dist" "$@" >"$OUT.rank0.log" 2>&1 || rc=$?
  else
    timeout 120 ./05_train "${COMMON[@]}" --grad-accum "$A" --out "$OUT" "$@" >"$OUT.rank0.log" 2>&1 || rc=$?
  fi
  for p in "${pids[@]}"; do wait "$p" || rc=$?; done
  return $rc
}

export OMP_NUM_THREADS=1
check "reference: 1 process, --grad-accum 6" 'run 1 6 "$T/ref" --max-steps 4'
check "K=2 x --grad-accum 3" 'run 2 3 "$T/k2" --max-steps 4'
check "K=3 x --grad-accum 2" 'run 3 2 "$T/k3" --max-steps 4'
check "K=1 with a communicator x --grad-accum 6" 'timeout 120 ./05_train "${COMMON[@]}" --grad-accum 6 --out "$T/k1c" --world-size 1 --dist-file "$T/k1c.dist" --max-steps 4 >"$T/k1c.rank0.log" 2>&1 && grep -q "^ranks: 1 (shared file)" "$T/k1c.rank0.log"'
# as mpirun starts them: rank and size from Open MPI's environment, no --rank/--world-size
OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2 ./05_train "${COMMON[@]}" --grad-accum 3 --max-steps 4 --out "$T/env" --dist-file "$T/env.dist" >"$T/env1.log" 2>&1 &
penv=$!
OMPI_COMM_WORLD_RANK=0 OMPI_COMM_WORLD_SIZE=2 timeout 120 ./05_train "${COMMON[@]}" --grad-accum 3 --max-steps 4 --out "$T/env" --dist-file "$T/env.dist" >"$T/env0.log" 2>&1
rcenv=$?
wait $penv
check "ranks from OMPI_COMM_WORLD_RANK/SIZE (mpirun) give K=2's log exactly" '[ $rcenv -eq 0 ] && grep -q "^ranks: 2" "$T/env0.log" && cmp -s <(cut -d, -f1-4 "$T/env/train_log.csv") <(cut -d, -f1-4 "$T/k2/train_log.csv")'
mkdir -p "$T/r1" "$T/r3"
cp -r "$T/k2/checkpoint-2" "$T/r1/" && cp -r "$T/k2/checkpoint-2" "$T/r3/" && cp "$T/k2/train_log.csv" "$T/r1/" && cp "$T/k2/train_log.csv" "$T/r3/"
check "resume K=2's step-2 checkpoint with K=1 x 6" 'run 1 6 "$T/r1" --max-steps 4 --resume "$T/r1"'
check "resume K=2's step-2 checkpoint with K=3 x 2" 'run 3 2 "$T/r3" --max-steps 4 --resume "$T/r3"'
check "rank 0 logs the steps, rank 1 prints none" 'grep -q "^step 4/4" "$T/k2.rank0.log" && ! grep -q "^step" "$T/k2.rank1.log"'
check "the checkpoint records the global accumulation" 'grep -q "\"grad_accum\": 6" "$T/k3/checkpoint-4/trainer_state.json"'

"$PY" - "$T" <<'EOF' || bad "the ranks against one process (above)"
import array, json, struct, sys
T = sys.argv[1]
def st(path):  # safetensors -> {name: flat list}; F32 and I64 are all these files hold
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    head = json.loads(raw[8:8 + n])
    out = {}
    for k, v in head.items():
        if k == "__metadata__": continue
        a, b = v["data_offsets"]
        assert v["dtype"] in ("F32", "I64"), v["dtype"]
        out[k] = array.array("f" if v["dtype"] == "F32" else "q", raw[8 + n + a: 8 + n + b]).tolist()
    return out
def log(path):
    rows = [l.split(",") for l in open(path).read().strip().split("\n")[1:]]
    return {int(r[0]): (float(r[1]), float(r[3])) for r in rows}
bad = 0
def expect(cond, msg):
    global bad
    print(("ok   " if cond else "FAIL ") + msg)
    bad += not cond
ref_log, ref_ad, ref_state = log(T + "/ref/train_log.csv"), st(T + "/ref/adapter_model.safetensors"), st(T + "/ref/checkpoint-4/train_state.safetensors")
for name in ["k2", "k3", "k1c", "r1", "r3"]:
    L = log(T + "/" + name + "/train_log.csv")
    steps = sorted(L)
    worst = max(abs(L[s][0] - ref_log[s][0]) / abs(ref_log[s][0]) for s in steps)
    worst_n = max(abs(L[s][1] - ref_log[s][1]) / max(abs(ref_log[s][1]), 1e-12) for s in steps)
    expect(steps == [1, 2, 3, 4] and worst <= 1e-5 and worst_n <= 1e-4,
           "%s: losses and gradient norms of steps 1-4 match the reference (worst relative %.2e, %.2e)" % (name, worst, worst_n))
    for what, mine, ref in [("adapter", st(T + "/" + name + "/adapter_model.safetensors"), ref_ad),
                            ("masters and moments", st(T + "/" + name + "/checkpoint-4/train_state.safetensors"), ref_state)]:
        ok, worst = sorted(mine) == sorted(ref), 0.0
        for k in ref:
            if k == "data.order":
                ok &= mine[k] == ref[k]; continue
            ok &= len(mine[k]) == len(ref[k])
            for a, b in zip(mine[k], ref[k]):
                r = abs(a - b) / (1e-6 + 1e-5 * abs(b))
                worst = max(worst, r)
                ok &= r <= 1
        expect(ok, "%s: final %s match the reference (worst |a-b| / (1e-6 + 1e-5|b|) = %.3f)" % (name, what, worst))
    # the trained state really moved (the comparison is not of two untouched copies)
moved = max(abs(x) for x in ref_ad[sorted(k for k in ref_ad if "lora_B" in k)[0]])
expect(moved > 1e-4, "training moved the adapter (max |B| = %.3g after 4 steps from B = 0)" % moved)
sys.exit(1 if bad else 0)
EOF

# 4. errors on one rank end every rank
printf 'x' >"$T/not_a_dir"
( ./05_train "${COMMON[@]}" --max-steps 4 --out "$T/not_a_dir" --world-size 2 --rank 1 --dist-file "$T/e.dist" >"$T/e1.log" 2>&1 ) &
p1=$!
timeout 60 ./05_train "${COMMON[@]}" --max-steps 4 --out "$T/e0" --world-size 2 --rank 0 --dist-file "$T/e.dist" >"$T/e0.log" 2>&1
rc0=$?
wait $p1; rc1=$?
check "a failing rank 1 exits non-zero with its sentence" '[ $rc1 -ne 0 ] && grep -q "^error: " "$T/e1.log"'
check "rank 0 stops (no hang) with one sentence naming rank 1" '[ $rc0 -ne 0 ] && [ $rc0 -ne 124 ] && grep -q "error: rank 1 of 2 stopped with an error" "$T/e0.log"'
check "no shared file is left behind" '! ls "$T"/e.dist* >/dev/null 2>&1'

./05_train "${COMMON[@]}" --max-steps 100000 --save-every 0 --out "$T/kill" --world-size 2 --rank 1 --dist-file "$T/kill.dist" >"$T/kill1.log" 2>&1 &
p1=$!
timeout 60 ./05_train "${COMMON[@]}" --max-steps 100000 --save-every 0 --out "$T/kill" --world-size 2 --rank 0 --dist-file "$T/kill.dist" >"$T/kill0.log" 2>&1 &
p0=$!
for _ in $(seq 100); do grep -q "^step" "$T/kill0.log" 2>/dev/null && break; sleep 0.1; done
kill -9 $p1
{ wait $p1; } 2>/dev/null
wait $p0; rc0=$?
check "rank 0 stops when rank 1 is killed" '[ $rc0 -ne 0 ] && [ $rc0 -ne 124 ] && grep -q "error: rank 1 of 2 (pid [0-9]*) ended without a word" "$T/kill0.log"'

# 5. the checkpoint's accumulation is global: 2 ranks x 2 is not the 6 it was trained with
mkdir -p "$T/bad" && cp -r "$T/k2/checkpoint-4" "$T/bad/"
run 2 2 "$T/bad" --max-steps 6 --resume "$T/bad" >/dev/null 2>&1
check "resuming with another global accumulation is refused" 'grep -q "trained with --grad-accum (times the ranks) 6 but this run asks for 4" "$T/bad.rank0.log"'

# a non-finite step: every rank sees the same sums, all stop, rank 0 alone says so
./05_train "${COMMON[@]}" --max-steps 5 --lr 1e35 --out "$T/nf" --world-size 2 --rank 1 --dist-file "$T/nf.dist" >"$T/nf1.log" 2>&1 &
p1=$!
timeout 60 ./05_train "${COMMON[@]}" --max-steps 5 --lr 1e35 --out "$T/nf" --world-size 2 --rank 0 --dist-file "$T/nf.dist" >"$T/nf0.log" 2>&1
rc0=$?
wait $p1; rc1=$?
check "a non-finite step stops both ranks (rank 0 says why, rank 1 is silent)" '[ $rc0 -eq 1 ] && [ $rc1 -eq 1 ] && grep -q "is not finite at step" "$T/nf0.log" && ! grep -q "not finite" "$T/nf1.log"'

# 7. flags a user can get wrong end with one sentence
bad_flags() {  # expected-text flags...
  local want=$1; shift
  ./05_train --init random --shape tiny --data "$T/d.tok" --ctx 64 --max-steps 1 --device cpu --out "$T/flags" "$@" >"$T/flags.log" 2>&1
  [ $? -ne 0 ] && grep -q "^error: .*$want" "$T/flags.log"
}
check "--world-size without --dist-file is refused" 'bad_flags "give --dist-file" --world-size 2'
check "--rank outside the world is refused" 'bad_flags "outside 0..1" --world-size 2 --rank 2 --dist-file "$T/f.dist"'
check "an existing --dist-file is refused" 'touch "$T/old.dist" && bad_flags "already exists" --world-size 2 --rank 0 --dist-file "$T/old.dist"'
check "--shard-weights on the CPU is refused after the plan" 'bad_flags "several GPU ranks\|trains on the CPU" --shard-weights && grep -q "shard-weights.*GiB per GPU" "$T/flags.log"'

[ $fails -eq 0 ] && echo "test_dist_train: K=2,3 ranks match one process with K-times accumulation, resume across world sizes, failures stop all ranks (seed $SEED)" && exit 0
echo "test_dist_train: FAILED (seed $SEED; logs in $T)"
trap - EXIT
exit 1
