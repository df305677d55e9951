#!/usr/bin/env bash
# The device run for stage 06: build, the GPU test, a user error, then the benchmark against
# HF transformers in the same run. Usage (GPU machine): bash bench/infer_device.sh [OUTDIR]
set -u
out=${1:-bench/results}
mkdir -p "$out"
nvidia-smi -L
rm -f build/04_*.o build/tests/test_gpu_infer 06_infer   # objects left by an older tree may not link
make -j16 GPU_ARCH=sm_90 06_infer build/tests/test_gpu_infer 2>&1 | grep -vE "^(nvcc|/|cc|gcc) " | tail -40
echo "== test_gpu_infer"; build/tests/test_gpu_infer; echo "exit $?"
echo "== a context too long for the GPU (expect one clear error)"
python3 -c "import numpy as np; (np.arange(3000) % 512).astype(np.uint16).tofile('/tmp/ids.bin')"
./06_infer --init random --shape tiny-gpu --device gpu --ctx 2000000000 --ppl /tmp/ids.bin; echo "exit $?"
echo "== perplexity, GPU vs CPU (tiny random model, RoPE factor 4)"
./06_infer --init random --shape tiny-gpu --device gpu --ctx 1024 --ppl /tmp/ids.bin --seq-len 512,1024 --stride 256
OMP_NUM_THREADS=16 ./06_infer --init random --shape tiny-gpu --device cpu --ctx 1024 --ppl /tmp/ids.bin --seq-len 512,1024 --stride 256
echo "== benchmark: ours"
./06_infer --init random --shape llama2-7b --device gpu --bench --bench-out "$out/infer_ours.json" && cat "$out/infer_ours.json"
echo "== benchmark: HF transformers (SDPA)"
PYTHONUNBUFFERED=1 python3 bench/infer_peer.py --ours "$out/infer_ours.json" --out "$out/infer_hf.json"
