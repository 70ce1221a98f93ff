#!/usr/bin/env bash
# One run on the lent GPU machine (`device` tool): install what its image lacks from the
# carried .whl/ (see ../shared/tools/gpu-wheels.sh), run the GPU tests, then the benchmarks.
# Usage there:  bash scripts/device-run.sh [tests] [offline-small] [offline] [llama-bs1]
#                 [prefix-<cache>-<scheduler>[-<kv tokens>] ...]
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
PB="python3 -m pegboard.core.cli.main"
for job in "${@:-tests}"; do
  case $job in
    tests) timeout 180 python3 -m pytest -q -m gpu -p no:cacheprovider --ignore-glob="tests/test_server*" tests 2>&1 | tail -15 | tee "$OUT/gpu-tests.log" ;;
    offline-small) timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --num-seqs 64 \
        --json "$OUT/offline-qwen3-64.json" 2>"$OUT/offline-qwen3-64.err" | tail -12 ;;
    offline) timeout 300 $PB bench offline --random-weights --config qwen3-0.6b \
        --json "$OUT/offline-qwen3-256.json" 2>"$OUT/offline-qwen3-256.err" | tail -12 ;;
    llama-bs1) timeout 150 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
        --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
        --json "$OUT/llama8b-bs1.json" 2>"$OUT/llama8b-bs1.err" | tail -12 ;;
    prefix-*) # prefix-<kv cache>-<scheduler>[-<kv cache tokens>]
        IFS=- read -r _ cache sched tokens <<<"$job"
        timeout 200 $PB bench prefix --random-weights --config qwen3-0.6b --kv-cache "$cache" \
        --scheduler "$sched" ${tokens:+--kv-cache-tokens $tokens} --json "$OUT/$job.json" \
        2>"$OUT/$job.err" | tail -4 ;;
  esac
done
