#!/usr/bin/env bash
# Long contexts on one GPU (--gpu-mem, host checkpoints, the tiled MLP, the attention in
# chunks of S2 groups), from the repository root, in parts that each fit one device call:
#   bash bench/train_mem_device.sh OUTDIR [tests|512k|longest|bars|all]
# tests:   tests/test_gpu_train_offload (offloaded, tiled and chunked steps = the in-memory
#          step), tests/test_gpu_train, tests/test_gpu_train_resume, then compute-sanitizer
#          memcheck on test_gpu_train_offload;
# 512k:    build/train_bench at LLaMA-2-7B shape, S2 (G = N/4), N = 524,288 with --gpu-mem 80
#          and the default host budget (05_plan.c plans 26 layer inputs in 104 GiB of pinned
#          host memory and the attention in chunks of one group there: test_train_plan);
# longest: N = 720,896 without a GPU budget (the planner's longest on a 139 GiB card with
#          110 GiB of host memory; LONGEST_CTX overrides);
# bars:    N = 262,144 with --gpu-mem 80 --host-mem 100, N = 100,000 with and without
#          --gpu-mem 80 (the bars, unchanged by the chunks: those plans do not chunk).
# One timed step per length, no warm-up (a step at these lengths is minutes). Logs and JSON land in OUTDIR as they go.
set -u
out=${1:-bench/results}
part=${2:-all}
mkdir -p "$out" build/tests
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  grep -E "MemTotal|MemAvailable" /proc/meminfo; echo "cgroup memory.max: $(cat /sys/fs/cgroup/memory.max 2>/dev/null || echo none)"; } | tee -a "$out/machine.log"
t0=$SECONDS
make -s GPU_ARCH=sm_90 -j 16 build/tests/test_gpu_train_offload build/tests/test_gpu_train build/tests/test_gpu_train_resume build/train_bench || exit 1
echo "built in $((SECONDS - t0)) s"
run_test() {  # name, timeout
  timeout "$2" "build/tests/$1" >> "$out/tests.log" 2>&1; local rc=$?
  echo "$1 exit $rc"; tail -n 1 "$out/tests.log"
}
bench() {  # seconds, json, flags...
  local limit=$1 json=$2; shift 2
  echo "== train_bench $*" | tee -a "$out/bench.log"
  timeout "$limit" build/train_bench --steps 1 --warmup 0 --out "$out/$json" "$@" 2>&1 | tee -a "$out/bench.log"
}
case $part in tests|all)
  run_test test_gpu_train_offload 120
  run_test test_gpu_train 60
  run_test test_gpu_train_resume 60
  timeout ${MEMCHECK_TIMEOUT:-150} compute-sanitizer --tool memcheck --print-limit 20 build/tests/test_gpu_train_offload > "$out/memcheck.log" 2>&1
  echo "memcheck exit $?"; grep -E "ERROR SUMMARY|test_gpu_train_offload:" "$out/memcheck.log" ;; esac
case $part in 512k|all) bench ${LONG_TIMEOUT:-540} bench_512k_80.json --ctx 524288 --gpu-mem 80 ;; esac
case $part in longest|all) bench ${LONG_TIMEOUT:-540} bench_longest.json --ctx ${LONGEST_CTX:-720896} ;; esac
case $part in bars|all)
  bench 170 bench_262k_80.json --ctx 262144 --gpu-mem 80 --host-mem 100
  bench 60 bench_100k_80.json --ctx 100000 --gpu-mem 80
  bench 60 bench_100k.json --ctx 100000 ;; esac
