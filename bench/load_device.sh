#!/usr/bin/env bash
# Issue 14's bars in one device run (from the repository root):
#   bash bench/load_device.sh OUTDIR TOKENIZER_DIR TEXT
# builds 05_train, 06_infer and every tests/test_gpu_*.c (for sm_90); writes a LLaMA-2-7B-shaped
# HF folder (bench/load_7b.py: three bf16 shards + index, random weights) to /tmp while the GPU
# tests run side by side; reads the shards once with cat (the read time the load is compared with: the
# files were just written, so both read the page cache); then 05_train --ctx 32768
# --max-steps 3 (its startup lines: load time, bytes, peak host RSS, MFU; progress lines:
# tok/s and MFU) and 06_infer with its adapter and no --device. Logs land in OUTDIR.
set -u
out=$1; tok=$2; text=$3; m=/tmp/llama2-7b-random
mkdir -p "$out" build/tests
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
export NCCL_HOME=${NCCL_HOME:-$(python3 -c "import nvidia.nccl;print(list(nvidia.nccl.__path__)[0])" 2>/dev/null)}
t0=$SECONDS
touch build/*.o 2>/dev/null
gpu_tests=$(ls tests/test_gpu_*.c | sed 's|tests/\(.*\)\.c|build/tests/\1|')
make -s GPU_ARCH=sm_90 -j 16 05_train 06_infer $gpu_tests > "$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
echo "built in $((SECONDS - t0)) s"
(PYTHONUNBUFFERED=1 python3 bench/load_7b.py "$m" "$tok" > "$out/make7b.log" 2>&1; echo "make7b exit $?" >> "$out/make7b.log") &
maker=$!
for t in $gpu_tests tests/test_gpu_dist.sh; do  # the GPU tests, side by side, while the folder is written
  n=$(basename "$t" .sh)
  case "$t" in *.sh) cmd="bash $t" ;; *) cmd=$t ;; esac
  (timeout ${TEST_TIMEOUT:-100} $cmd > "$out/$n.log" 2>&1; echo "$n exit $?: $(tail -n 1 "$out/$n.log")" > "$out/$n.rc") &
done
wait
cat "$out"/*.rc; cat "$out/make7b.log"
du -sb "$m"/*.safetensors
t1=$(date +%s.%N); cat "$m"/*.safetensors > /dev/null; t2=$(date +%s.%N)
echo "cat of the shards: $(python3 -c "print(f'{$t2 - $t1:.2f}')") s"
timeout ${TRAIN_TIMEOUT:-150} ./05_train --model "$m" --data "$text" --ctx 32768 --max-steps 3 --out /tmp/run7b 2>&1 | tee "$out/train7b.log"
echo "05_train exit ${PIPESTATUS[0]}"
timeout ${INFER_TIMEOUT:-90} ./06_infer --model "$m" --adapter /tmp/run7b --ctx 32768 --prompt "The weights of a model" --max-new 32 2>&1 | tee "$out/infer7b.log"
echo "06_infer exit ${PIPESTATUS[0]}"
ls -la /tmp/run7b/adapter_model.safetensors
