#!/usr/bin/env bash
# Where an attention backward's warps wait, instruction by instruction (on the GPU machine,
# from the repository root):
#   bash bench/attn_stalls.sh sm90|sm80 OUTDIR [attn_profile.py options]
# e.g. the step-26 pair (bench/NOTES.md): S2 at G = 1k against the full kernel at N = G,
#   bash bench/attn_stalls.sh sm90 build/stalls/full --n 1024 --no-peer
#   bash bench/attn_stalls.sh sm90 build/stalls/s2 --n 4096 --g 1024 --no-peer
#   python3 bench/attn_source.py build/stalls/full/ours.csv build/stalls/s2/ours.csv
# and ours beside FlashAttention-2's on the A100 path (sm80 also profiles FA2's backward,
# whose kernel torch's SDPA flash runs in the same process),
#   bash bench/attn_stalls.sh sm80 build/stalls/16k --n 16384
#   python3 bench/attn_source.py build/stalls/16k/ours.csv build/stalls/16k/fa2.csv
# builds 04_s2attn.cu as the stage's shared library (sm90: sm_90a code; sm80: compute_80 PTX
# only, the mma.sync kernels an A100 runs, as bench/attn_sm80.sh), runs Nsight Compute on
# the second backward launch of bench/attn_profile.py (clocks left alone; the
# SourceCounters and WarpStateStats sections), and writes OUTDIR/ours.ncu-rep, the kernel's
# details page (ours.details.csv) and its source page with per-instruction stall samples
# (ours.csv), and the same as fa2.* for FA2's kernel when the peer runs. It times nothing:
# bench/attn_ab.sh and bench/attn_sm80.sh do that.
set -eu
arch=${1:?usage: bash bench/attn_stalls.sh sm90|sm80 OUTDIR [attn_profile.py options]}
out=${2:?usage: bash bench/attn_stalls.sh sm90|sm80 OUTDIR [attn_profile.py options]}
shift 2
case $arch in
sm80) gencode="-gencode=arch=compute_80,code=compute_80"; ours=flash_bwd_kernel ;;
sm90) gencode="-gencode=arch=compute_90a,code=sm_90a"; ours=flash_bwd_tma_kernel ;;
*) echo "attn_stalls.sh: the architecture is sm80 or sm90, not '$arch'" >&2; exit 1 ;;
esac
NVCC=${NVCC:-nvcc}
CUDA_HOME=${CUDA_HOME:-$(dirname "$(dirname "$(command -v "$NVCC")")")}
NCU=${NCU:-$(command -v ncu || echo "$CUDA_HOME/bin/ncu")}
PY=${PYTHON:-python3}
mkdir -p "$out"
lib=$out/libs2attn-$arch.so
$NVCC -O3 -std=c++17 $gencode -DUSE_CUDA -I. -shared -Xcompiler -fPIC -o "$lib" 04_s2attn.cu -L"$CUDA_HOME/lib64" -lcudart
profile() { # name kernel-regex attn_profile.py-options...
    local name=$1 kernel=$2
    shift 2
    "$NCU" --clock-control none --kernel-name regex:"$kernel" --launch-skip 1 --launch-count 1 \
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section InstructionStats \
        --section SourceCounters -f -o "$out/$name" "$PY" bench/attn_profile.py "$lib" "$@" > "$out/$name.log" 2>&1 || {
        echo "attn_stalls.sh: ncu failed on $name (the log: $out/$name.log)" >&2; exit 1; }
    "$NCU" -i "$out/$name.ncu-rep" --page details --csv > "$out/$name.details.csv"
    "$NCU" -i "$out/$name.ncu-rep" --page source --csv --print-source sass > "$out/$name.csv"
}
profile ours "$ours" "$@"
case " $* " in
*" --no-peer "*) ;;
*) profile fa2 flash_bwd_dq_dk_dv "$@" ;;
esac
"$PY" bench/attn_source.py "$out"/ours.csv $([ -f "$out/fa2.csv" ] && echo "$out/fa2.csv") --top 20
