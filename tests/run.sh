#!/usr/bin/env bash
# Runs every test under tests/ and ends with one line "N passed, N failed, N skipped".
# A test passes with exit 0, is skipped with exit 77 (it prints why), fails otherwise.
#   bash tests/run.sh          every test (make test)
#   bash tests/run.sh --gpu    the GPU tests alone (tests/test_gpu_*), then compute-sanitizer's
#                              memcheck, racecheck and synccheck on the attention kernels' test
#                              (its --quick set: every tile variant; make test-gpu)
cd "$(dirname "$0")/.." || exit 1
gpu_only=0
[ "${1:-}" = --gpu ] && gpu_only=1
pass=0; fail=0; skip=0; failed=()
mkdir -p build/logs
run_one() {  # name, command...
  local name=$1; shift
  local log=build/logs/$name.log t0=$SECONDS
  "$@" >"$log" 2>&1; local rc=$?
  local dt=$((SECONDS - t0))
  if [ $rc -eq 0 ]; then pass=$((pass+1)); printf 'PASS  %-28s %4ss  %s\n' "$name" "$dt" "$(tail -n 1 "$log")"
  elif [ $rc -eq 77 ]; then skip=$((skip+1)); printf 'SKIP  %-28s %4ss  %s\n' "$name" "$dt" "$(tail -n 1 "$log")"
  else fail=$((fail+1)); failed+=("$name"); printf 'FAIL  %-28s %4ss  (exit %d)\n' "$name" "$dt" "$rc"; sed 's/^/      | /' "$log" | tail -n 40
  fi
}
for src in tests/test_*.c; do
  [ -e "$src" ] || continue
  [ $gpu_only = 1 ] && continue
  case "$src" in tests/test_gpu_*) continue ;; esac
  name=$(basename "$src" .c); run_one "$name" "build/tests/$name"
done
for src in tests/test_gpu_*.c; do
  [ -e "$src" ] || continue
  name=$(basename "$src" .c)
  if [ -z "${USE_CUDA:-}" ]; then skip=$((skip+1)); printf 'SKIP  %-28s        no nvcc/cuBLAS: GPU test not built\n' "$name"
  elif [ -z "${HAVE_GPU:-}" ]; then skip=$((skip+1)); printf 'SKIP  %-28s        no GPU on this machine (built, not run)\n' "$name"
  else run_one "$name" "build/tests/$name"; fi
done
for src in tests/test_*.sh; do
  [ -e "$src" ] || continue
  case "$src" in tests/test_gpu_*) ;; *) [ $gpu_only = 1 ] && continue ;; esac
  name=$(basename "$src" .sh); run_one "$name" bash "$src"
done
if [ $gpu_only = 1 ]; then
  for tool in memcheck racecheck synccheck; do
    name=sanitizer_$tool
    if [ -z "${USE_CUDA:-}" ] || [ -z "${HAVE_GPU:-}" ]; then skip=$((skip+1)); printf 'SKIP  %-28s        needs a GPU and a CUDA build\n' "$name"
    elif ! command -v compute-sanitizer > /dev/null; then skip=$((skip+1)); printf 'SKIP  %-28s        compute-sanitizer is not on PATH\n' "$name"
    else run_one "$name" compute-sanitizer --tool $tool --error-exitcode 1 --print-limit 20 build/tests/test_gpu_attention --quick; fi
  done
fi
[ $fail -eq 0 ] || echo "failed: ${failed[*]}"
echo "$pass passed, $fail failed, $skip skipped"
[ $fail -eq 0 ]
