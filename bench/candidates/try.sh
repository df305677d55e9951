#!/usr/bin/env bash
# Kernel changes written but not yet run on a GPU, checked and timed in one call (on the GPU
# machine, from the repository root):
#   bash bench/candidates/try.sh [OUTDIR] [--sm90 | --sm90-only] [--cases N:G,...] [A.patch B.patch ...]
#   bash bench/candidates/try.sh --prepare [A.patch ...]    (only writes the versions, below)
#   bash bench/candidates/try.sh --prepared [OUTDIR] [--sm90] [A.patch ...]
# applies the patches (default: bench/candidates/*.patch, in name order) in order to a copy
# of 04_s2attn.cu, one version a step (the tree's kernel is version 0), builds each as
# bench/attn_sm80.sh builds the stage (compute_80 PTX only: the mma.sync kernels an A100
# runs, JIT-compiled on a Hopper card), runs tests/test_gpu_attention on each (every tile
# variant, odd N, GQA, S2, outputs poisoned; nothing is timed if a version fails), then times
# all versions in turns in one process with bench/attn_ab.sh at d = 128 and d = 64. JSON:
# OUTDIR/candidates_sm80_d128.json and _d64 (OUTDIR defaults to build/cand). With --sm90 the
# same for the sm_90a build as well; --sm90-only checks and times only that build (for patches
# to the Hopper kernels), at d = 128 and 64; --cases N:G,... is passed to bench/attn_ab.cu
# (e.g. --cases 1024:0,4096:1024,4096:0,16384:0 for a change to a block's fixed cost).
# Where the GPU machine has no patch(1), --prepare writes the versions on a machine that has it
# and --prepared then uses build/cand/v*.cu as they are (they travel with the build folder).
# A candidate that wins is applied to 04_s2attn.cu by hand (git apply), with its NOTES step,
# and then every GPU test and the sanitizers run on it, as for any kernel change.
set -eu
patches=
out=build/cand
sm90=0
sm80=1
mode=all
cases=()
expect_cases=0
for arg in "$@"; do
    if [ $expect_cases = 1 ]; then cases=(--cases "$arg"); expect_cases=0; continue; fi
    case $arg in
    --sm90) sm90=1 ;;
    --sm90-only) sm90=1 sm80=0 ;;
    --cases) expect_cases=1 ;;
    --prepare) mode=prepare ;;
    --prepared) mode=prepared ;;
    *.patch) patches="$patches $arg" ;;
    *) out=$arg ;;
    esac
done
if [ -z "$patches" ]; then
    patches=$(find bench/candidates -maxdepth 1 -name '*.patch' | sort)
    [ -n "$patches" ] || { echo "try.sh: no candidate patches in bench/candidates (none is waiting to be run)" >&2; exit 1; }
fi
NVCC=${NVCC:-nvcc}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v "$NVCC")")")}
mkdir -p "$out" build/cand
libs=(-L"$CUDA_HOME/lib64" -lcudart -lcublas -lcublasLt -lstdc++)

# version 0 is the tree's kernel; version i applies the first i patches
versions="build/cand/v0.cu"
i=0
if [ $mode = prepared ]; then
    for p in $patches; do
        i=$((i + 1))
        [ -f "build/cand/v$i.cu" ] || { echo "try.sh: build/cand/v$i.cu is missing (run try.sh --prepare first)" >&2; exit 1; }
        versions="$versions build/cand/v$i.cu"
    done
else
    command -v patch > /dev/null ||
        { echo "try.sh: needs patch(1) (Debian's package patch), or versions made by --prepare" >&2; exit 1; }
    cp 04_s2attn.cu build/cand/v0.cu
    for p in $patches; do
        patch -s -N --batch -r - -o "build/cand/v$((i + 1)).cu" "build/cand/v$i.cu" < "$p" > /dev/null ||
            { echo "try.sh: $p does not apply to version $i (04_s2attn.cu changed since it was written)" >&2; exit 1; }
        i=$((i + 1))
        versions="$versions build/cand/v$i.cu"
    done
    [ $mode = prepare ] && { echo "try.sh: wrote $versions"; exit 0; }
fi
cmp -s 04_s2attn.cu build/cand/v0.cu ||
    { echo "try.sh: build/cand/v0.cu is not this tree's 04_s2attn.cu (run try.sh --prepare again)" >&2; exit 1; }

check() { # ARCH_FLAGS TAG: builds and runs the kernel checks of every version
    local flags=(-O3 -std=c++17 "$1" -DUSE_CUDA -I.) tag=$2
    $NVCC "${flags[@]}" -c -o "build/cand/04_layers-$tag.o" 04_layers.cu
    for v in $versions; do
        local n
        n=$(basename "$v" .cu)-$tag
        $NVCC "${flags[@]}" -c -o "build/cand/$n.o" "$v" &
    done
    for job in $(jobs -p); do wait "$job"; done
    for v in $versions; do
        local n
        n=$(basename "$v" .cu)-$tag
        ${CC:-cc} -O2 -std=gnu11 -fopenmp -DUSE_CUDA -I. -I"$CUDA_HOME/include" -o "build/cand/test-$n" \
            tests/test_gpu_attention.c "build/cand/04_layers-$tag.o" "build/cand/$n.o" "${libs[@]}" -lm
        local r
        r=$(bash bench/attn_check.sh "build/cand/test-$n" "build/cand/check-$n.log") ||
            { echo "try.sh: $n failed its checks (build/cand/check-$n.log); nothing was timed" >&2; exit 1; }
        echo "$n: $r"
    done
}

if [ $sm80 = 1 ]; then
    check "-gencode=arch=compute_80,code=compute_80" sm80
    # shellcheck disable=SC2086 # the versions are one word each
    bash bench/attn_ab.sh sm80 "${cases[@]}" $versions > "$out/candidates_sm80_d128.json"
    # shellcheck disable=SC2086
    bash bench/attn_ab.sh sm80 --d 64 "${cases[@]}" $versions > "$out/candidates_sm80_d64.json"
fi
if [ $sm90 = 1 ]; then
    check "-gencode=arch=compute_90a,code=sm_90a" sm90
    # shellcheck disable=SC2086
    bash bench/attn_ab.sh sm90 "${cases[@]}" $versions > "$out/candidates_sm90_d128.json"
    if [ $sm80 = 0 ]; then
        # shellcheck disable=SC2086
        bash bench/attn_ab.sh sm90 --d 64 "${cases[@]}" $versions > "$out/candidates_sm90_d64.json"
    fi
fi
cat "$out"/candidates_*.json
