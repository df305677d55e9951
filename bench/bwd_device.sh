#!/usr/bin/env bash
# The backward's version 3b (04_s2attn.cu backward variants 4-6, bench/NOTES.md step 12),
# checked and then timed in one device run (from the repository root, on the GPU machine):
#   bash bench/bwd_device.sh [OUTDIR]
# 1. builds 04_s2attn, build/libs2attn.so and tests/test_gpu_attention for sm_90a;
# 2. tests/test_gpu_attention: every forward and backward variant, the new ones included,
#    against version 1 and the CPU stage (odd N, GQA, S2, outputs poisoned); nothing is timed
#    if it fails;
# 3. compute-sanitizer memcheck, racecheck and synccheck on the test's --quick set (every
#    variant again);
# 4. ./04_s2attn --variants at d = 128 and d = 64: every backward variant timed alone
#    (backward FLOPs = 2.5x the forward's, over the backward's own time);
# 5. ./04_s2attn --bench --bwd-variant V for V = 3 (today's default) and 4, 5, 6, each into
#    OUTDIR/attn_ours_bwdV.json, then bench/sdpa_peer.py once, in the same call: the torch
#    check of backward variant BWD_CHECK (default 5) and SDPA flash and cuDNN on the same
#    shapes; last, a table of every variant's forward+backward and backward alone against them.
# Each part is time-boxed so that the whole should fit one 10-minute device call; logs in
# OUTDIR. PARTS=check runs 1-3 only, PARTS=time 1, 4 and 5 (two calls, where one is too short).
set -u
out=${1:-bench/results}
check=${BWD_CHECK:-5}
parts=${PARTS:-all}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$SECONDS
make -s GPU_ARCH=sm_90 -j 8 04_s2attn build/libs2attn.so build/tests/test_gpu_attention || exit 1
echo "built in $((SECONDS - t0)) s"

if [ "$parts" != time ]; then
    timeout ${TEST_TIMEOUT:-150} stdbuf -oL build/tests/test_gpu_attention > "$out/test_gpu_attention.log" 2>&1
    rc=$?
    grep -c FAIL "$out/test_gpu_attention.log" | sed 's/^/FAIL lines: /'
    if [ $rc -ne 0 ]; then  # 124: timed out (a hang shows as the last variant line)
        echo "test_gpu_attention exit $rc: the first failures and the last lines:"
        grep -B3 FAIL "$out/test_gpu_attention.log" | head -40
        tail -5 "$out/test_gpu_attention.log"
        exit 1
    fi
    tail -1 "$out/test_gpu_attention.log"
    echo "test_gpu_attention passed ($((SECONDS - t0)) s)"
    for tool in memcheck racecheck synccheck; do
        timeout ${SANITIZER_TIMEOUT:-100} compute-sanitizer --tool $tool --print-limit 20 build/tests/test_gpu_attention --quick > "$out/sanitizer_$tool.log" 2>&1
        echo "$tool exit $?: $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|hazard" "$out/sanitizer_$tool.log" | tail -2 | tr '\n' ' ') $(tail -1 "$out/sanitizer_$tool.log")"
    done
    echo "sanitizers done ($((SECONDS - t0)) s)"
fi
[ "$parts" = check ] && exit 0

for d in 128 64; do
    timeout ${VARIANTS_TIMEOUT:-60} ./04_s2attn --variants --d $d 2>&1 | grep -E "^tile|^backward" | tee "$out/variants_bwd_d$d.log"
done

for v in 3 4 5 6; do
    timeout ${BENCH_TIMEOUT:-150} ./04_s2attn --bench --bwd-variant $v --out "$out/attn_ours_bwd$v.json" > "$out/bench_bwd$v.log" 2>&1
    echo "--bench --bwd-variant $v exit $?"
done
PYTHONUNBUFFERED=1 timeout ${PEER_TIMEOUT:-150} python3 bench/sdpa_peer.py --lib build/libs2attn.so --bwd-variant $check \
    --ours "$out/attn_ours_bwd$check.json" --out "$out/attn_sdpa_bwd.json" 2>&1 | grep -v Warning | tee "$out/sdpa_bwd.log"

python3 - "$out" <<'EOF'
import json, os, sys
out = sys.argv[1]
def load(p):
    try:
        with open(os.path.join(out, p)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def bwd(r):  # backward alone: 2.5x the forward FLOPs over (fwd+bwd - fwd) time
    flop = r["fwd_tflops"] * r["fwd_ms"]
    return 2.5 * flop / (r["fwdbwd_ms"] - r["fwd_ms"])
peer = load("attn_sdpa_bwd.json") or {}
rows = {v: {(r["N"], r["G"]): r for r in j["attention"]} for v in (3, 4, 5, 6) if (j := load(f"attn_ours_bwd{v}.json"))}
ref = {name: {r["N"]: r for r in peer.get(name, [])} for name in ("flash", "cudnn")}
print("fwd+bwd TFLOP/s | backward alone, d = 128, causal (S2 rows: in-segment FLOPs)")
print(f"{'N':>6} {'G':>5} " + " ".join(f"{'v' + str(v):>13}" for v in rows) + f" {'flash':>13} {'cuDNN':>13}")
for key in sorted(next(iter(rows.values()), {})):
    cells = [f"{rows[v][key]['fwdbwd_tflops']:6.1f}|{bwd(rows[v][key]):6.1f}" if key in rows[v] else f"{'-':>13}" for v in rows]
    for name in ("flash", "cudnn"):
        r = ref[name].get(key[0]) if key[1] == 0 else None
        cells.append(f"{r['fwdbwd_tflops']:6.1f}|{bwd(r):6.1f}" if r else f"{'-':>13}")
    print(f"{key[0]:>6} {key[1]:>5} " + " ".join(cells))
EOF
echo "done in $((SECONDS - t0)) s"
