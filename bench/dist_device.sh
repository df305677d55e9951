#!/usr/bin/env bash
# Data-parallel training throughput on one host of several GPUs (from the repository root):
#   bash bench/dist_device.sh [OUTDIR]          (KS="1 2 4 8" CTX=32768 STEPS=4 by default)
# For K in 1, 2, 4, 8 ranks (one process per GPU, NCCL; rank r uses GPU r) it trains
# 05_train on a random-weight LLaMA-2-7B (--init random --shape llama2-7b) at N = 32k with
# S2-Attn, batch 1, --grad-accum 1 (so K sequences per step), LoRA r=8 q,k,v,o + embed +
# norms, and reads rank 0's train_log.csv: tokens/s is the median over the steps after the
# first (the first includes the kernels' first-use set-up). Scaling efficiency is
# tokens/s(K) / (K x tokens/s(1)). JSON goes to OUTDIR/dist_ours.json, a table to stdout.
# Without mpirun the ranks are started here with --rank/--world-size/--dist-file; with
# Open MPI installed, `mpirun -np K ./05_train ... --dist-file F` is the same run.
# Each process builds the 7B model in fp32 on the host first (27 GB each; 8 ranks: ~216 GB).
set -u
out=${1:-bench/results}
KS=${KS:-"1 2 4 8"}
CTX=${CTX:-32768}
STEPS=${STEPS:-4}
PY=${PYTHON:-python3}
mkdir -p "$out" build
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
ngpu=$(nvidia-smi -L | grep -c GPU)
make -s 05_train GPU_ARCH=sm_90 || exit 1
./05_train --help | grep -q -- --world-size || { echo "05_train has no --world-size"; exit 1; }
# enough tokens for 8 ranks x STEPS steps of CTX (random ids: throughput does not depend on them)
"$PY" - "build/dist_bench.tok" "$CTX" "$STEPS" <<'EOF' || exit 1
import random, struct, sys
path, ctx, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
n = 8 * steps * ctx + 1
r = random.Random(1)
ids = [r.randrange(32000) for _ in range(n)]
with open(path, "wb") as f:
    f.write(b"LLTK" + struct.pack("<IIQ", 1, 2, n) + struct.pack("<%dH" % n, *ids))
EOF
for K in $KS; do
  if [ "$K" -gt "$ngpu" ]; then echo "K=$K: only $ngpu GPUs, skipped"; continue; fi
  run=$out/dist_k$K
  rm -rf "$run" "build/dist_bench_k$K.id" "build/dist_bench_k$K.id.failed"
  flags=(--init random --shape llama2-7b --data build/dist_bench.tok --ctx "$CTX" --batch 1 --grad-accum 1
         --max-steps "$STEPS" --warmup 0 --lr 2e-5 --device gpu --out "$run" --peak-tflops ${PEAK_TFLOPS:-989})
  pids=()
  for ((r = 1; r < K; r++)); do
    timeout ${RUN_TIMEOUT:-540} ./05_train "${flags[@]}" --world-size "$K" --rank "$r" --dist-file "build/dist_bench_k$K.id" \
        >"$out/dist_k${K}_rank$r.log" 2>&1 &
    pids+=($!)
  done
  if [ "$K" -gt 1 ]; then
    timeout ${RUN_TIMEOUT:-540} ./05_train "${flags[@]}" --world-size "$K" --rank 0 --dist-file "build/dist_bench_k$K.id" 2>&1 | tee "$out/dist_k${K}_rank0.log"
  else
    timeout ${RUN_TIMEOUT:-540} ./05_train "${flags[@]}" 2>&1 | tee "$out/dist_k${K}_rank0.log"
  fi
  for p in "${pids[@]}"; do wait "$p" || echo "K=$K: a rank exited with $?"; done
done
"$PY" - "$out" "$KS" "$CTX" <<'EOF'
import json, os, statistics, subprocess, sys
out, ks, ctx = sys.argv[1], [int(k) for k in sys.argv[2].split()], int(sys.argv[3])
dev = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True).stdout.split("\n")[0]
rows, base = [], None
for k in ks:
    path = os.path.join(out, "dist_k%d" % k, "train_log.csv")
    if not os.path.exists(path):
        rows.append({"ranks": k, "error": "no train_log.csv (see dist_k%d_rank0.log)" % k}); continue
    lines = [l.split(",") for l in open(path).read().strip().split("\n")[1:]]
    tps = [float(l[6]) for l in lines[1:]] or [float(l[6]) for l in lines]
    mem = max(float(l[8]) for l in lines)
    med = statistics.median(tps)
    if k == 1: base = med
    eff = med / (k * base) if base else None
    rows.append({"ranks": k, "tokens_per_second": med, "per_gpu": med / k, "scaling_efficiency": eff, "peak_memory_gib_rank0": mem,
                 "steps_timed": len(tps), "loss_last": float(lines[-1][1])})
print("%5s %12s %12s %10s %9s" % ("ranks", "tok/s", "tok/s/GPU", "efficiency", "mem GiB"))
for r in rows:
    if "error" in r: print("%5d  %s" % (r["ranks"], r["error"])); continue
    e = "%.1f%%" % (100 * r["scaling_efficiency"]) if r["scaling_efficiency"] else "n/a"
    print("%5d %12.0f %12.0f %10s %9.2f" % (r["ranks"], r["tokens_per_second"], r["per_gpu"], e, r["peak_memory_gib_rank0"]))
json.dump({"impl": "ours (05_train, data parallel over NCCL)", "device": dev, "shape": "llama2-7b", "ctx": ctx,
           "recipe": "batch 1 per rank, grad-accum 1, S2-Attn G=N/4, LoRA r=8 q,k,v,o + embed + norms, ZeRO-1 AdamW, checkpointing",
           "results": rows}, open(os.path.join(out, "dist_ours.json"), "w"), indent=2)
EOF
