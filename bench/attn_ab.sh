#!/usr/bin/env bash
# Two or more versions of 04_s2attn.cu timed against each other in one process (on the GPU
# machine, from the repository root):
#   bash bench/attn_ab.sh sm80|sm90 [--d 64] [--cases N:G,...] A.cu B.cu [...] > ab.json
# e.g. the previous commit against the working tree, on the A100 path:
#   git show HEAD~1:04_s2attn.cu > build/ab/prev.cu   (where git is)
#   bash bench/attn_ab.sh sm80 build/ab/prev.cu 04_s2attn.cu
# Each file is built as the stage's shared library with this tree's headers: sm80 from
# compute_80 PTX only (the mma.sync kernels an A100 runs, JIT-compiled on a Hopper card, as
# bench/attn_sm80.sh), sm90 for sm_90a. bench/attn_ab.cu loads them and times them in turns
# (why, and what it prints: its head comment); the gradients' differences go to stderr.
# Correctness is not this script's: run tests/test_gpu_attention on each version first.
set -eu
arch=${1:?usage: bash bench/attn_ab.sh sm80|sm90 [--d 64] [--cases N:G,...] A.cu B.cu [...]}
shift
case $arch in
sm80) gencode="-gencode=arch=compute_80,code=compute_80" ;;
sm90) gencode="-gencode=arch=compute_90a,code=sm_90a" ;;
*) echo "attn_ab.sh: the architecture is sm80 or sm90, not '$arch'" >&2; exit 1 ;;
esac
dflag=() # the driver's options, passed on
while [ "${1:-}" = --d ] || [ "${1:-}" = --cases ]; do dflag+=("$1" "$2"); shift 2; done
[ $# -ge 1 ] || { echo "attn_ab.sh: no .cu file to build" >&2; exit 1; }
NVCC=${NVCC:-nvcc}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v "$NVCC")")")}
mkdir -p build/ab
libs=()
i=0
for src in "$@"; do
    [ -f "$src" ] || { echo "attn_ab.sh: $src is not a file" >&2; exit 1; }
    lib=build/ab/$i-$(basename "$src" .cu)-$arch.so
    $NVCC -O3 -std=c++17 $gencode -DUSE_CUDA -I. -shared -Xcompiler -fPIC -o "$lib" "$src" -L"$CUDA_HOME/lib64" -lcudart &
    libs+=("$lib")
    i=$((i + 1))
done
$NVCC -O3 -std=c++17 -I. -o build/ab/attn_ab bench/attn_ab.cu -L"$CUDA_HOME/lib64" -lcudart -ldl &
for job in $(jobs -p); do wait "$job"; done
build/ab/attn_ab "${dflag[@]}" "${libs[@]}"
