#!/usr/bin/env bash
# Builds every tests/fuzz_*.c as a libFuzzer target under AddressSanitizer and UBSan and
# runs each for a short smoke time (FUZZ_SECONDS, default 20), or for FUZZ_RUNS executions
# (make fuzz: 10 M each, the long run whose counts the README records), from its seed corpus
# (tests/fuzz_corpus/<name>/, plus any seeds a target's generator adds). A crash, leak,
# sanitizer report or timeout fails the test; the crashing input is kept in build/fuzz/.
set -u
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-20}
runs=${FUZZ_RUNS:-}
limit=(-max_total_time="$secs")
[ -n "$runs" ] && limit=(-runs="$runs")
if ! command -v clang >/dev/null 2>&1; then
  if [ -n "${CI:-}" ]; then echo "clang is required for the fuzz smoke test in CI"; exit 1; fi
  echo "skip: clang (with libFuzzer) is not installed"; exit 77
fi
mkdir -p build/fuzz
fail=0; ran=0
for src in tests/fuzz_*.c; do
  [ -e "$src" ] || continue
  name=$(basename "$src" .c)
  bin=build/fuzz/$name
  if ! clang -g -O1 -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=undefined -I. -o "$bin" "$src" -lm 2>build/fuzz/$name.build.log; then
    echo "FAIL $name: does not build"; sed 's/^/  /' build/fuzz/$name.build.log | head -20; fail=1; continue
  fi
  corpus=build/fuzz/$name.corpus
  rm -rf "$corpus"; mkdir -p "$corpus"
  [ -d tests/fuzz_corpus/$name ] && cp tests/fuzz_corpus/$name/* "$corpus"/ 2>/dev/null
  # a target may ship a seed generator: tests/fuzz_corpus/<name>.sh writes seeds into $1
  [ -x tests/fuzz_corpus/$name.sh ] && bash tests/fuzz_corpus/$name.sh "$corpus" >/dev/null 2>&1
  t0=$SECONDS
  if (cd build/fuzz && ASAN_OPTIONS=detect_leaks=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
        ./$name "${limit[@]}" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix=./$name- $name.corpus >$name.log 2>&1); then
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' build/fuzz/$name.log | grep -o '[0-9]*$')
    [ -n "$execs" ] || execs=$(grep -oE '#[0-9]+' build/fuzz/$name.log | tail -1 | tr -d '#')
    echo "ok   $name: ${execs:-?} inputs in $((SECONDS - t0))s, no findings"
    ran=$((ran+1))
  else
    echo "FAIL $name: the fuzzer found a problem (build/fuzz/$name.log):"
    grep -E 'ERROR|SUMMARY|runtime error|Test unit written' build/fuzz/$name.log | head -10 | sed 's/^/  /'
    fail=1
  fi
done
label="smoke"; [ -n "$runs" ] && label="($runs executions each)"
echo "fuzz $label: $ran targets clean${fail:+, failures: $fail}" | sed 's/, failures: 0//'
exit $fail
