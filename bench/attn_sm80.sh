#!/usr/bin/env bash
# The A100 path measured on a Hopper card (from the repository root, on the GPU machine):
#   bash bench/attn_sm80.sh [--build-only | --no-build] [OUTDIR]
# builds the attention stage from compute_80 PTX only (no sm_90a code, so the driver
# JIT-compiles the PTX at start and the library falls back to its mma.sync kernels, the ones
# an A100 runs), into build/sm80/, checks that build with tests/test_gpu_attention (nothing is
# timed if it fails), then, for d = 128 and d = 64, runs `04_s2attn --bench --d D` and
# bench/sdpa_peer.py against that build: our sm_80 kernels next to SDPA flash
# (FlashAttention-2) and cuDNN in the same run, ours and flash on the same tensors in turns
# at BENCH_ALTERNATE (default 4096,16384,32768: the like-for-like ratio the bar is read
# from), and the torch check of those kernels. JSON: OUTDIR/attn_ours_sm80.json and
# OUTDIR/attn_sdpa_sm80.json (d = 128), OUTDIR/attn_ours_sm80_d64.json and
# OUTDIR/attn_sdpa_sm80_d64.json (d = 64); OUTDIR defaults to bench/results.
# The H200 is a proxy: more bandwidth and another clock than an A100, so compare against the
# SDPA numbers of the same run, not against A100 figures. --build-only stops after the build
# (so that it can run beside other work); --no-build checks and times an earlier one.
set -eu
build=1 run=1
case "${1:-}" in --build-only) run=0; shift ;; --no-build) build=0; shift ;; esac
out=${1:-bench/results}
mkdir -p "$out" build/sm80
NVCC=${NVCC:-nvcc}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v "$NVCC")")")}
flags="-O3 -std=c++17 -gencode=arch=compute_80,code=compute_80 -DUSE_CUDA -I."
libs="-L$CUDA_HOME/lib64 -lcudart -lcublas -lcublasLt -lstdc++"
if [ $build = 1 ]; then
    t0=$SECONDS
    $NVCC $flags -c -o build/sm80/04_layers.o 04_layers.cu
    $NVCC $flags -DS2ATTN_MAIN -o build/sm80/04_s2attn 04_s2attn.cu build/sm80/04_layers.o $libs
    $NVCC $flags -shared -Xcompiler -fPIC -o build/sm80/libs2attn.so 04_s2attn.cu -L"$CUDA_HOME/lib64" -lcudart
    # the kernel checks of `make test` against this build: every tile variant (where there is no
    # sm_90a code each falls back to its mma.sync kernel) on odd N, GQA and S2, before any timing
    $NVCC $flags -c -o build/sm80/04_s2attn.o 04_s2attn.cu
    ${CC:-cc} -O2 -std=gnu11 -fopenmp -DUSE_CUDA -I. -I"$CUDA_HOME/include" -o build/sm80/test_gpu_attention tests/test_gpu_attention.c \
        build/sm80/04_layers.o build/sm80/04_s2attn.o $libs -lm
    echo "built (compute_80 PTX) in $((SECONDS - t0)) s"
fi
[ $run = 1 ] || exit 0
bash bench/attn_check.sh build/sm80/test_gpu_attention build/sm80/attention_check.log
for d in 128 64; do
    sfx=$([ $d = 128 ] || echo _d$d)
    build/sm80/04_s2attn --bench --d $d --out "$out/attn_ours_sm80$sfx.json"
    python3 bench/sdpa_peer.py --d $d --alternate "${BENCH_ALTERNATE:-4096,16384,32768}" --alternate-with flash \
        --lib build/sm80/libs2attn.so --ours "$out/attn_ours_sm80$sfx.json" --out "$out/attn_sdpa_sm80$sfx.json"
done
