#!/usr/bin/env bash
# Long contexts on one GPU (--gpu-mem, host checkpoints, the tiled MLP), in one device run
# from the repository root:  bash bench/train_mem_device.sh [OUTDIR]
# 1. tests/test_gpu_train_offload (offloaded + tiled step = in-memory step), 2. the bars:
# build/train_bench at LLaMA-2-7B shape, S2, N = 262,144 and 524,288 with --gpu-mem 80, then
# N = 100,000 with and without --gpu-mem 80, 3. tests/test_gpu_train and
# tests/test_gpu_train_resume, 4. compute-sanitizer memcheck on test_gpu_train_offload.
# Each part is time-boxed; logs and JSON land in OUTDIR as they go (six files).
set -u
out=${1:-bench/results}
mkdir -p "$out" build/tests
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  grep -E "MemTotal|MemAvailable" /proc/meminfo; echo "cgroup memory.max: $(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo none)"; } | tee "$out/tests.log"
t0=$SECONDS
make -s GPU_ARCH=sm_90 -j 16 build/tests/test_gpu_train_offload build/tests/test_gpu_train build/tests/test_gpu_train_resume build/train_bench || exit 1
echo "built in $((SECONDS - t0)) s"
run_test() {  # name, timeout
  timeout "$2" "build/tests/$1" >> "$out/tests.log" 2>&1; local rc=$?
  echo "$1 exit $rc"; tail -n 1 "$out/tests.log"
}
run_test test_gpu_train_offload 60
bench() {  # seconds, json, flags...
  local limit=$1 json=$2; shift 2
  echo "== train_bench $*" | tee -a "$out/bench.log"
  timeout "$limit" build/train_bench --steps 1 --warmup 0 --out "$out/$json" "$@" 2>&1 | tee -a "$out/bench.log"
}
bench ${LONG_TIMEOUT:-170} bench_262k.json --ctx 262144,524288 --gpu-mem 80 --host-mem 100
bench 60 bench_100k_80.json --ctx 100000 --gpu-mem 80
bench 60 bench_100k.json --ctx 100000
run_test test_gpu_train 60
run_test test_gpu_train_resume 60
timeout ${MEMCHECK_TIMEOUT:-90} compute-sanitizer --tool memcheck --print-limit 20 build/tests/test_gpu_train_offload > "$out/memcheck.log" 2>&1
echo "memcheck exit $?"; grep -E "ERROR SUMMARY|test_gpu_train_offload:" "$out/memcheck.log"
