#!/usr/bin/env bash
# One run on the lent GPU machine (`device` tool): install what its image lacks from the
# carried .whl/ (see ../shared/tools/gpu-wheels.sh), run the GPU tests, then the benchmarks.
# Usage there:  [BENCH_ARGS="--attention triton" TAG=-triton] bash scripts/device-run.sh
#                 [tests] [offline-small] [offline] [llama-bs1]
#                 [prefix-<cache>-<scheduler>[-<kv tokens>] ...] [offline-peer] [serve-qwen3]
#                 [offline-peer256] [ablation] [profile]
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# The device tool returns at most 8 files: pack everything into one archive at the end.
trap '(cd "$OUT" && tar czf /tmp/all-$$.tgz --exclude="all-*.tgz" . \
  && find . -mindepth 1 -maxdepth 1 ! -name "all-*.tgz" -exec rm -rf {} + && mv /tmp/all-$$.tgz .)' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
if [ -d .kernels ]; then  # FlashInfer kernels prebuilt by `pegboard kernels build` (no JIT here)
  export PEGBOARD_FLASHINFER_KERNELS=$PWD/.kernels FLASHINFER_DISABLE_JIT=1 \
    FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer-ws
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
PB="python3 -m pegboard.core.cli.main"
for job in "${@:-tests}"; do
  case $job in
    tests) timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider --ignore-glob="tests/test_server*" --ignore=tests/test_bench.py tests 2>&1 | tail -15 | tee "$OUT/gpu-tests.log"
        # not marked gpu (they run on the CPU interpreter too), but on CUDA they test the kernel
        timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gumbel_sampling.py 2>&1 | tail -3 | tee -a "$OUT/gpu-tests.log" ;;
    offline-small) timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --num-seqs 64 \
        ${BENCH_ARGS:-} --json "$OUT/offline-qwen3-64${TAG:-}.json" 2>"$OUT/offline-qwen3-64${TAG:-}.err" | tail -12 ;;
    offline) timeout 300 $PB bench offline --random-weights --config qwen3-0.6b \
        ${BENCH_ARGS:-} --json "$OUT/offline-qwen3-256${TAG:-}.json" 2>"$OUT/offline-qwen3-256${TAG:-}.err" | tail -12 ;;
    llama-bs1) timeout 150 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
        --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
        ${BENCH_ARGS:-} --json "$OUT/llama8b-bs1${TAG:-}.json" 2>"$OUT/llama8b-bs1${TAG:-}.err" | tail -12 ;;
    prefix-*) # prefix-<kv cache>-<scheduler>[-<kv cache tokens>]
        IFS=- read -r _ cache sched tokens <<<"$job"
        timeout 200 $PB bench prefix --random-weights --config qwen3-0.6b --kv-cache "$cache" \
        --scheduler "$sched" ${tokens:+--kv-cache-tokens $tokens} --json "$OUT/$job.json" \
        2>"$OUT/$job.err" | tail -4 ;;
    offline-peer) # pegboard, then transformers (continuous batching) on the same workload
        timeout 210 $PB bench offline --random-weights --config qwen3-0.6b --num-seqs 64 \
        --max-input 512 --max-output 512 --peer transformers --peer-timeout 90 \
        --json "$OUT/offline-peer.json" --chart "$OUT/offline-peer.png" 2>"$OUT/offline-peer.err" \
        | tail -22 ;;
    offline-peer256) # the nano-vllm workload (256 seqs) through pegboard, then transformers
        timeout 420 $PB bench offline --random-weights --config qwen3-0.6b ${BENCH_ARGS:-} \
        --peer transformers --peer-timeout 300 --json "$OUT/offline-peer256.json" \
        --chart "$OUT/offline-peer256.png" 2>"$OUT/offline-peer256.err" | tail -30 ;;
    profile-host) # host ms per phase on the nano-vllm workload (issue 17), inline vs thread detokenizer
        for d in inline thread; do
          timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            --detokenizer $d ${BENCH_ARGS:-} --json "$OUT/profile-host-$d.json" 2>"$OUT/profile-host-$d.err" | tail -4
        done ;;
    llama-bs1-tp2) # Llama-3.1-8B batch 1 across two GPUs (symmetric-memory all-reduce, then NCCL)
        for ar in auto nccl; do
          PEGBOARD_TP_ALLREDUCE=$([ $ar = nccl ] && echo nccl) timeout 200 $PB bench offline --random-weights \
            --config llama-3.1-8b --num-seqs 1 --min-input 128 --max-input 128 --min-output 256 \
            --max-output 256 --max-model-len 4096 --tp-size 2 ${BENCH_ARGS:-} \
            --json "$OUT/llama8b-bs1-tp2-$ar.json" 2>"$OUT/llama8b-bs1-tp2-$ar.err" | tail -4
        done ;;
    w4a16) # W4A16 kernels per layer vs bf16 and one decode step's linears (issue 15)
        timeout 300 python3 scripts/bench_w4a16.py --step --json "$OUT/w4a16.json" 2>&1 | tail -40 ;;
    w4a16-sweep) # launch configurations per layer and M (decode rows), written as the measured
        # table: copy $OUT/w4a16_configs.json to core/kernels/ and commit it (issue 15)
        timeout 580 python3 scripts/bench_w4a16.py --sweep --budget-s 480 --rows ${ROWS:-1,2,4,8,16} \
          --write-table "$OUT/w4a16_configs.json" --json "$OUT/w4a16-sweep.json" 2>&1 | grep -v "^  skip" | tail -40 ;;
    llama-bs1-w4a16) # Llama-3.1-8B batch 1, random weights quantized to W4A16 g128 at load, then bf16
        for q in gptq none; do
          timeout 200 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
            --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
            $([ $q = none ] || echo --quantization $q) ${BENCH_ARGS:-} \
            --json "$OUT/llama8b-bs1-$q.json" 2>"$OUT/llama8b-bs1-$q.err" | tail -4
        done ;;
    offline-w4a16) # the nano-vllm workload (Qwen3-0.6B) with W4A16 weights, then bf16
        for q in gptq none; do
          timeout 200 $PB bench offline --random-weights --config qwen3-0.6b \
            $([ $q = none ] || echo --quantization $q) ${BENCH_ARGS:-} \
            --json "$OUT/offline-w4a16-$q.json" 2>"$OUT/offline-w4a16-$q.err" | tail -4
        done ;;
    kv-fp8) # FP8 KV (issue 15): decode kernel bf16 vs fp8 (dot / fma variants); the nano-vllm
        # workload at equal batch (KV sized from memory: capacity does not bind), then at equal
        # KV memory (6.1 GiB: 57,344 bf16 tokens or 114,688 fp8 ones for Qwen3-0.6B)
        timeout 150 python3 scripts/bench_kv_fp8.py --kernels --json "$OUT/kv-fp8-kernels.json" 2>&1 | tail -5
        for v in "auto::" "fp8_e4m3::dot" "fp8_e4m3::fma" "auto:57344:" "fp8_e4m3:114688:dot" "fp8_e4m3:114688:fma"; do
          IFS=: read -r dt tok how <<<"$v"; name=kv-$dt-${tok:-free}${how:+-$how}
          echo "== $name"
          PEGBOARD_FP8_DECODE=${how:-dot} timeout 150 $PB bench offline --random-weights --config qwen3-0.6b \
            --kv-cache-dtype $dt ${tok:+--kv-cache-tokens $tok} ${BENCH_ARGS:-} --json "$OUT/$name.json" \
            2>"$OUT/$name.err" | tail -3
        done ;;
    offline-fp8) # the nano-vllm workload with an FP8 KV cache (compare with offline / profile-host)
        timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --kv-cache-dtype fp8_e4m3 \
          ${BENCH_ARGS:-} --json "$OUT/offline-fp8.json" 2>"$OUT/offline-fp8.err" | tail -6 ;;
    dp) # nano-vllm workload served by one replica, then by two behind the router (issue 11)
        for name in dp1 dp2; do
          extra=(); [ $name = dp2 ] && extra=(--server-args "--dp-size 2 --router-policy least_load")
          timeout 240 $PB bench serve --random-weights --config qwen3-0.6b --num-prompts 256 \
            --min-input 100 --max-input 1024 --min-output 100 --max-output 1024 --no-progress \
            "${extra[@]}" --json "$OUT/serve-$name.json" 2>"$OUT/serve-$name.err" | tail -8
        done ;;
    router-prefix) # cache-aware vs round-robin routing over two replicas, shared-prefix workload
        timeout 300 $PB bench prefix --random-weights --config qwen3-0.6b \
          --router-policies cache_aware,round_robin --router-dp-size 2 --json "$OUT/router-prefix.json" \
          2>"$OUT/router-prefix.err" | tail -12 ;;
    gpu-tests-lead) # the GPU tests of overlap, memory sizing, sampling and graphs only
        timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_gumbel_sampling.py \
          tests/test_overlap.py::test_overlap_on_the_gpu_with_cuda_graphs tests/test_gpu_memory.py \
          tests/test_sampling.py tests/test_cuda_graph.py 2>&1 | tail -15 | tee "$OUT/gpu-tests-lead.log" ;;
    ablation) # nano-vllm workload with one feature off at a time (ABLATE: extra variants,
        # NAME:flag,flag)
        for v in "base:" "no-overlap:--disable-overlap" "no-graphs:--disable-cuda-graph" \
                 "no-fused:--disable-fused-kernels" ${ABLATE:-}; do
          name=${v%%:*}; flags=${v#*:}; flags=${flags//,/ }
          timeout 200 $PB bench offline --random-weights --config qwen3-0.6b ${BENCH_ARGS:-} $flags \
            --json "$OUT/ablation-$name.json" 2>"$OUT/ablation-$name.err" >/dev/null \
            || { echo "$name failed"; tail -5 "$OUT/ablation-$name.err"; }
        done
        python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/ablation-*.json")):
    r = json.load(open(f))
    print(f"{f.split('ablation-')[1][:-5]:<14} {r['elapsed_s']:>8.2f} s {r['output_tok_s']:>10.1f} out tok/s "
          f"steps {r['steps']} plugin layer {r['plugin_layer']['plugin_layer_share_pct']} % {r['plugins']['attention']}")
PY
        ;;
    profile) # host time per phase, overlap on and off
        for v in "overlap:" "no-overlap:disable_overlap=true"; do
          timeout 200 python3 scripts/profile_offline.py --config qwen3-0.6b ${v#*:} \
            --json "$OUT/profile-${v%%:*}.json" 2>"$OUT/profile-${v%%:*}.err" | tail -22
        done ;;
    flashinfer) # the flashinfer backend with the kernels prebuilt in .kernels (FlashInfer may not
        # compile here): its GPU tests, then the attention micro-benchmark beside triton and torch
        export PEGBOARD_FLASHINFER_KERNELS=$PWD/.kernels FLASHINFER_DISABLE_JIT=1 \
          FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer-ws
        timeout 240 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_attention_flashinfer.py \
          2>&1 | tail -15 | tee "$OUT/flashinfer-tests.log"
        timeout 150 python3 scripts/bench_attention.py --json "$OUT/bench-attention.json" \
          --backends triton,flashinfer,flashinfer-tc,flashinfer-cc,torch 2>&1 | tee "$OUT/bench-attention.log"
        echo "FlashInfer modules compiled at run time: $(find /tmp/flashinfer-ws -name '*.so' | wc -l)" \
          | tee -a "$OUT/flashinfer-tests.log" ;;
    serve-qwen3) # `pegboard serve` with random Qwen3-0.6B weights, loaded by `bench serve`
        python3 - >"$OUT/serve-qwen3-server.log" 2>&1 <<'PY' &
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.bench.models import config_model_dir
from pegboard.core.config import EngineConfig
from pegboard.core.server.lifecycle import ServerSettings, ServerState
from pegboard.core.server.runner import run_server

config = EngineConfig(model=str(config_model_dir("qwen3-0.6b")), load_format="dummy", metrics=["prometheus"])
state = ServerState(ServerSettings(["qwen3-0.6b"]), engine_factory=lambda: AsyncEngine.from_config(config))
raise SystemExit(run_server(state, "127.0.0.1", 8000, "warning"))
PY
        server=$!
        timeout 120 $PB bench serve --url http://127.0.0.1:8000 --wait 60 --num-prompts 64 \
        --concurrency 16 --max-input 1024 --min-output 64 --max-output 256 --time-limit 50 \
        --no-progress --json "$OUT/serve-qwen3.json" --chart "$OUT/serve-qwen3.png" \
        2>"$OUT/serve-qwen3.err" | tail -40
        kill -TERM $server 2>/dev/null; wait $server ;;
  esac
done
