#!/usr/bin/env bash
# Tile variants of the attention kernels, checked and then timed against SDPA, in device runs
# (from the repository root, on the GPU machine):
#   KERNEL=fwd|bwd BENCH="128:10 64:11" [CHECK=V] [PARTS=check|time|all] bash bench/attn_device.sh [OUTDIR]
# 1. builds 04_s2attn, build/libs2attn.so and tests/test_gpu_attention for sm_90a;
# 2. tests/test_gpu_attention: every forward and backward variant against version 1 and the
#    CPU stage (odd N, GQA, S2, outputs poisoned); nothing is timed if it fails;
# 3. compute-sanitizer memcheck, racecheck and synccheck on the test's --quick set (every
#    variant again);
# 4. ./04_s2attn --variants at d = 128 and d = 64: every variant of KERNEL timed alone (the
#    backward's FLOPs are 2.5x the forward's, over the backward's own time);
# 5. for each D:V of BENCH, ./04_s2attn --bench --d D --KERNEL-variant V into
#    OUTDIR/attn_ours_KERNELV_dD.json; then, once per head dim, bench/sdpa_peer.py --d D: the
#    torch check of KERNEL's variant CHECK (default: the first of BENCH at that D) and SDPA
#    flash and cuDNN on the same shapes in the same call; last, a table of each timed variant
#    against them (forward; forward+backward | backward alone).
# Each part is time-boxed; logs in OUTDIR. On the H200 the check takes about 1 minute, each
# --bench about 83 s and each sdpa_peer.py about a minute, so PARTS=check (1-3) and
# PARTS=time (1, 4, 5) go in two device calls. bench/bwd_device.sh is this with KERNEL=bwd.
set -u
out=${1:-bench/results}
kernel=${KERNEL:-fwd}
bench=${BENCH:-128:10 64:11}
parts=${PARTS:-all}
case $kernel in fwd|bwd) ;; *) echo "KERNEL must be fwd or bwd, got '$kernel'"; exit 2 ;; esac
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

name=$([ "$kernel" = fwd ] && echo forward || echo backward)
for d in 128 64; do
    timeout ${VARIANTS_TIMEOUT:-60} ./04_s2attn --variants --d $d 2>&1 | grep -E "^tile|^$name" | tee "$out/variants_${kernel}_d$d.log"
done

dims=""
for dv in $bench; do
    d=${dv%%:*} v=${dv##*:}
    timeout ${BENCH_TIMEOUT:-150} ./04_s2attn --bench --d "$d" --$kernel-variant "$v" --out "$out/attn_ours_$kernel${v}_d$d.json" > "$out/bench_$kernel${v}_d$d.log" 2>&1
    echo "--bench --d $d --$kernel-variant $v exit $? ($((SECONDS - t0)) s)"
    case " $dims " in *" $d:"*) ;; *) dims="$dims $d:${CHECK:-$v}" ;; esac
done
for dc in $dims; do
    d=${dc%%:*} c=${dc##*:}
    PYTHONUNBUFFERED=1 timeout ${PEER_TIMEOUT:-150} python3 bench/sdpa_peer.py --lib build/libs2attn.so --d "$d" --$kernel-variant "$c" \
        --ours "$out/attn_ours_$kernel${c}_d$d.json" --out "$out/attn_sdpa_d$d.json" 2>&1 | grep -v Warning | tee "$out/sdpa_d$d.log"
done

python3 - "$out" "$kernel" "$bench" <<'EOF'
import json, os, sys
out, kernel, bench = sys.argv[1], sys.argv[2], sys.argv[3].split()
def load(p):
    try:
        with open(os.path.join(out, p)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
def bwd(r):  # backward alone: 2.5x the forward FLOPs over (fwd+bwd - fwd) time
    return 2.5 * r["fwd_tflops"] * r["fwd_ms"] / (r["fwdbwd_ms"] - r["fwd_ms"])
def cell(r):
    return f"{r['fwd_tflops']:6.1f}|{r['fwdbwd_tflops']:6.1f}|{bwd(r):6.1f}" if r else f"{'-':>20}"
for d in sorted({int(x.split(":")[0]) for x in bench}, reverse=True):
    runs = {int(x.split(":")[1]): j for x in bench if int(x.split(":")[0]) == d and (j := load(f"attn_ours_{kernel}{x.split(':')[1]}_d{d}.json"))}
    peer = load(f"attn_sdpa_d{d}.json") or {}
    ref = {name: {r["N"]: r for r in peer.get(name, [])} for name in ("flash", "cudnn")}
    rows = {v: {(r["N"], r["G"]): r for r in j["attention"]} for v, j in runs.items()}
    print(f"d = {d}, causal (S2 rows: in-segment FLOPs), TFLOP/s forward | forward+backward | backward alone")
    print(f"{'N':>6} {'G':>5} " + " ".join(f"{kernel + str(v):>20}" for v in rows) + f" {'SDPA flash':>20} {'cuDNN':>20}")
    for key in sorted(next(iter(rows.values()), {})):
        cells = [cell(rows[v].get(key)) for v in rows]
        cells += [cell(ref[name].get(key[0]) if key[1] == 0 else None) for name in ("flash", "cudnn")]
        print(f"{key[0]:>6} {key[1]:>5} " + " ".join(cells))
EOF
echo "done in $((SECONDS - t0)) s"
