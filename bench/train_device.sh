#!/usr/bin/env bash
# The GPU training benchmark and its checks, in one device run (from the repository root):
#   bash bench/train_device.sh [OUTDIR]
# builds (make's targets, for sm_90) and runs tests/test_gpu_train (GPU step vs CPU step) and
# tests/test_gpu_train_resume (05_train --device gpu; MEMCHECK=1 adds compute-sanitizer), then
# bench/train_bench.c (ours) and bench/train_peer.py (transformers + peft) at LLaMA-2-7B
# shape, random weights, batch 1, LoRA r=8 q,k,v,o + embed + norms, S2-Attn, checkpointing,
# N = 8k, 16k, 32k, 65k, 100k. Each part is time-boxed; JSON lands in OUTDIR as it goes.
set -u
out=${1:-bench/results}
mkdir -p "$out" build/tests
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
t0=$SECONDS
make -s GPU_ARCH=sm_90 -j 2 build/tests/test_gpu_train build/tests/test_gpu_train_resume build/train_bench || exit 1
echo "built in $((SECONDS - t0)) s"
timeout ${TEST_TIMEOUT:-120} build/tests/test_gpu_train 2>&1 | tee "$out/test_gpu_train.log"
echo "test_gpu_train exit ${PIPESTATUS[0]}"
timeout ${TEST_TIMEOUT:-120} build/tests/test_gpu_train_resume 2>&1 | tee "$out/test_gpu_train_resume.log"
echo "test_gpu_train_resume exit ${PIPESTATUS[0]}"
if [ -n "${MEMCHECK:-}" ]; then  # the whole GPU step under compute-sanitizer (slow)
  timeout ${MEMCHECK_TIMEOUT:-150} compute-sanitizer --tool memcheck --print-limit 20 build/tests/test_gpu_train > "$out/memcheck.log" 2>&1
  echo "memcheck exit $?"; grep -E "ERROR SUMMARY|test_gpu_train:" "$out/memcheck.log"
fi
timeout ${OURS_TIMEOUT:-200} build/train_bench --ctx ${CTX:-8192,16384,32768,65536,100000} --steps ${STEPS:-2} --out "$out/train_ours.json" 2>&1 | tee "$out/train_ours.log"
PYTHONUNBUFFERED=1 timeout ${PEER_TIMEOUT:-200} python3 bench/train_peer.py --ctx ${CTX:-8192,16384,32768,65536,100000} --steps ${STEPS:-2} \
    --out "$out/train_peer.json" 2>&1 | grep -v Warning | tee "$out/train_peer.log"
echo "== ours"; grep -A8 "^N " "$out/train_ours.log"
echo "== peer"; grep -A8 "^N " "$out/train_peer.log"
