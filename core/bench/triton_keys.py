"""Which Triton specializations a GPU run would compile after the engine's warm-up, found on a
CPU: the engine runs under Triton's interpreter with the GPU's start-up rehearsed, while a
`KeyRecorder` (`pegboard.core.kernels.jit_keys`) notes each launch's CUDA key.

Why a rehearsal: on a CPU the engine captures no CUDA graphs, yet on the GPU the captures are
the warm-up (each graph is run once uncaptured first: that compiles its kernels) and every step
that replays a graph launches no kernel at all. `rehearse_gpu_startup` makes the CPU engine
take the GPU's path: decode graphs for every capture size (at the longest context, as
`CUDAGraphRunner` captures them) and mixed-step graphs for every token bucket, each "captured"
by its uncaptured warm-up run, each "replay" run eagerly with the recorder paused; the fused
kernels on (norm, rope, activation, and the GEMV / skinny GEMM with the H200 tables of
Qwen3-0.6B's layers: `mirrored_linear_tables`), the Gumbel sampling kernel on, and the decode
kernel's split count chosen for an H200's 132 SMs. Whatever the recorder sees outside the warm-up is
what the GPU would compile in the middle of a step.

`python scripts/triton_keys.py` runs it; tests/test_triton_keys.py keeps it at zero.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

import torch

#: Streaming multiprocessors of the GPU whose decode split counts the rehearsal uses (H200).
GPU_SMS = 132

#: A Qwen3-0.6B-shaped model scaled down for the interpreter: its GQA group (2), q/k norms,
#: tied embeddings, a vocabulary of two sampling blocks (`gumbel.BLOCK`); its five weight shapes
#: differ, so each takes the launch tables of Qwen3-0.6B's (`mirrored_linear_tables`).
TINY_QWEN3 = {
    "architectures": ["Qwen3ForCausalLM"],
    "model_type": "qwen3",
    "head_dim": 32,
    "hidden_act": "silu",
    "hidden_size": 64,
    "intermediate_size": 96,
    "max_position_embeddings": 1024,
    "num_attention_heads": 4,
    "num_hidden_layers": 2,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
    "vocab_size": 4096,
    "bos_token_id": 1,
    "eos_token_id": 2,
}


def tiny_model_dir(config: dict | None = None) -> Path:
    """A directory holding only `config.json` (`TINY_QWEN3` by default), for `load_format=
    "dummy"` (random weights)."""
    out = Path(tempfile.mkdtemp(prefix="pegboard-triton-keys-"))
    (out / "config.json").write_text(json.dumps(config or TINY_QWEN3))
    return out


class _PausedReplay:
    """A rehearsed graph: replaying runs the model eagerly (the CPU needs the outputs) with the
    recorder paused, since a GPU replay launches no kernel."""

    def __init__(self, recorder, run) -> None:
        self.recorder, self.run = recorder, run

    def replay(self) -> None:
        with self.recorder.paused():
            self.run()


@contextlib.contextmanager
def rehearse_gpu_startup(recorder, sms: int = GPU_SMS) -> Iterator[None]:
    """While active, engines built on a CPU (`TRITON_INTERPRET=1`, attention `triton`) take
    the GPU's path: graph captures rehearsed (warm-up run recorded, replays paused), fused
    kernels on, the Gumbel kernel sampling, decode splits for `sms` SMs."""
    from pegboard.core import cuda_graph, kernels, model_runner
    from pegboard.core.cuda_graph_mixed import MixedGraphRunner
    from pegboard.plugins.kernels.triton_attention import decode
    from pegboard.plugins.sampling import standard

    class DecodeGraphs(cuda_graph.CUDAGraphRunner):
        def _capture(self, rows: int, with_logits: bool):
            self._run(rows, with_logits=with_logits)  # the warm-up before a capture
            return _PausedReplay(
                recorder, lambda: self._run(rows, into_static=True, with_logits=with_logits)
            )

    class MixedGraphs(MixedGraphRunner):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **(kwargs | {"capture": False}))
            with torch.inference_mode():
                for size in reversed(self.sizes):  # as captured: largest first
                    self.prepare_capture(size)
                    self._run(size)  # the warm-up before a capture
                    self.graphs[size] = _PausedReplay(recorder, lambda s=size: self._run(s))

    def graphs_supported(device, backend) -> str | None:
        return cuda_graph.graph_unsupported_reason(torch.device("cuda"), backend)

    with contextlib.ExitStack() as stack:
        patch = stack.enter_context
        patch(mock.patch.object(model_runner, "graph_unsupported_reason", graphs_supported))
        patch(mock.patch.object(model_runner, "CUDAGraphRunner", DecodeGraphs))
        patch(mock.patch.object(model_runner, "MixedGraphRunner", MixedGraphs))
        patch(mock.patch.object(kernels, "unavailable_reason", lambda device: None))
        patch(mock.patch.object(standard, "_gumbel_available", lambda device: True))
        patch(mock.patch.object(decode, "num_sms", lambda device: sms))
        yield


@dataclass
class Workload:
    """Requests of the nano-vllm benchmark's kind, scaled down: prompt lengths uniform in
    `prompt_lens`, output lengths uniform in `output_lens`; most rows sampled at temperature
    0.6 (the benchmark's), some greedy, some with a repetition penalty (float32 logits) and
    some with top-k (the sampler's filtered path)."""

    num_requests: int = 48
    prompt_lens: tuple[int, int] = (1, 200)
    output_lens: tuple[int, int] = (1, 12)
    seed: int = 0

    def requests(self, vocab: int) -> tuple[list[list[int]], list]:
        from pegboard.sdk.types import SamplingParams

        rng = random.Random(self.seed)
        prompts, params = [], []
        for i in range(self.num_requests):
            n = rng.randint(*self.prompt_lens)
            prompts.append([rng.randrange(3, vocab) for _ in range(n)])
            kind = i % 8
            params.append(
                SamplingParams(
                    max_tokens=rng.randint(*self.output_lens),
                    temperature=0.0 if kind == 1 else 0.6,
                    repetition_penalty=1.1 if kind == 2 else 1.0,
                    top_k=20 if kind == 3 else 0,
                    ignore_eos=True,
                )
            )
        return prompts, params


#: What both engines share: Triton attention, random weights, no detokenizer process.
_ENGINE = dict(attention="triton", load_format="dummy", detokenizer="inline")
#: The engine the CPU rehearsal builds: small budgets so that prompts are chunked, steps mix
#: prefill and decode tokens, and decode batches shrink as requests finish.
ENGINE = _ENGINE | dict(
    device="cpu",
    dtype="float32",
    page_size=16,
    kv_cache_tokens=16384,
    max_model_len=512,
    max_num_batched_tokens=256,
    max_running_requests=32,
    cuda_graph_max_bs=32,
)


def _weight_shapes(config: dict) -> list[tuple[int, int]]:
    """`(N, K)` of the qkv, o, gate/up, down and LM-head weights of a Qwen3 config."""
    head, hidden, inter = config["head_dim"], config["hidden_size"], config["intermediate_size"]
    q, kv = config["num_attention_heads"] * head, config["num_key_value_heads"] * head
    return [(q + 2 * kv, hidden), (hidden, q), (2 * inter, hidden), (hidden, inter),
            (config["vocab_size"], hidden)]  # fmt: skip


@contextlib.contextmanager
def mirrored_linear_tables(tiny: dict, real: str = "qwen3-0.6b") -> Iterator[None]:
    """While active, the tiny model's linear layers pick the GEMV and skinny-GEMM launch
    configurations the H200 tables hold for the same layer of `real` (bf16), so their keys'
    variety (rows of x: 1, 2-8, 9-256 by bucket) is the real model's."""
    from importlib import resources

    from pegboard.core.kernels import gemv, skinny_gemm

    text = resources.files("pegboard.core").joinpath(f"configs/{real}.json").read_text()
    pairs = list(zip(_weight_shapes(tiny), _weight_shapes(json.loads(text))))
    table = skinny_gemm.parse_table(skinny_gemm.read_table(skinny_gemm.TABLE), "NVIDIA H200")
    dtype = getattr(torch, tiny["torch_dtype"])
    decode = dict(gemv.DECODE_CONFIGS)
    skinny = {}
    for shape, real_shape in pairs:
        if (torch.bfloat16, *real_shape) in gemv.DECODE_CONFIGS:
            decode[(dtype, *shape)] = gemv.DECODE_CONFIGS[(torch.bfloat16, *real_shape)]
        if (torch.bfloat16, *real_shape) in table:
            skinny[(dtype, *shape)] = table[(torch.bfloat16, *real_shape)]
    with (
        mock.patch.object(gemv, "DECODE_CONFIGS", decode),
        mock.patch.object(skinny_gemm, "device_configs", lambda device: skinny),
    ):
        yield


#: The benchmark's vocabulary and largest batch: its rows cross the Gumbel kernel's chunk
#: steps (`gumbel.chunk_size`) at 55, 111 and 228.
GPU_VOCAB, GPU_ROWS = 151936, 256


def sampling_programs(vocab: int, max_rows: int) -> int:
    """`gumbel.TARGET_PROGRAMS` for a run of `vocab` tokens and up to `max_rows` rows whose
    chunk steps fall at the same fractions of its batch range as the benchmark's do."""
    from pegboard.plugins.sampling import gumbel

    return max(1, round(gumbel.TARGET_PROGRAMS * vocab / GPU_VOCAB * max_rows / GPU_ROWS))


def record(workload: Workload | None = None, model_dir: Path | None = None, **settings) -> tuple:
    """Build an engine under `rehearse_gpu_startup` (recorded as phase "warm-up"), run
    `workload` (phase "run"); the recorder and the run's outputs."""
    from pegboard.core.kernels.jit_keys import KeyRecorder
    from pegboard.core.llm import LLM

    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("set TRITON_INTERPRET=1 (before anything imports triton)")
    workload = workload or Workload()
    from pegboard.plugins.sampling import gumbel

    config = ENGINE | settings
    programs = sampling_programs(TINY_QWEN3["vocab_size"], config["max_running_requests"])
    torch.set_flush_denormal(True)  # the skipped kernels leave garbage: no slow denormals
    try:
        with (
            KeyRecorder(execute=_sampling) as recorder,
            rehearse_gpu_startup(recorder),
            mock.patch.object(gumbel, "TARGET_PROGRAMS", programs),
            mirrored_linear_tables(TINY_QWEN3),
        ):
            with recorder.phase("warm-up"):
                llm = LLM(str(model_dir or tiny_model_dir()), **config)
            with llm:
                prompts, params = workload.requests(llm.engine.info.vocab_size)
                outs = llm.generate(prompts, params)
    finally:
        torch.set_flush_denormal(False)
    return recorder, outs


def _sampling(kernel: str) -> bool:
    """The kernels the rehearsal runs: the sampler's (the engine checks the token ids they
    write); the model's are recorded only (the workload ignores EOS, so no value steers it)."""
    return kernel.startswith("pegboard.plugins.sampling.")


#: The engine the GPU check builds: Qwen3-0.6B's shapes (random weights, the measured GEMV
#: and skinny-GEMM tables apply), the default graphs, budgets that chunk long prompts. The KV
#: pool is sized in tokens (every running request at its longest), not by the free memory: in
#: a GPU test shard the pytest process that spawns the check holds what earlier tests' engines
#: left in torch's cache, and the check failed there (session 17) where it passed alone.
GPU_ENGINE = _ENGINE | dict(
    device="cuda",
    dtype="bfloat16",
    max_model_len=2048,
    max_num_batched_tokens=2048,
    max_running_requests=64,
    cuda_graph_max_bs=64,
    kv_cache_tokens=64 * 2048,
)


def count_gpu_compiles(workload: Workload | None = None, config: str = "qwen3-0.6b", **settings):
    """On a GPU: build the engine (its warm-up compiles what it will), then run `workload`
    counting the Triton specializations compiled or loaded meanwhile (`CompileCounter`);
    the list of `(kernel, Triton's description)` and the number of outputs. Run it in a fresh
    process: kernels an earlier test compiled would hide a key the warm-up misses."""
    from pegboard.core.bench.models import config_model_dir
    from pegboard.core.kernels.jit_keys import CompileCounter
    from pegboard.core.llm import LLM

    workload = workload or Workload(num_requests=128, prompt_lens=(1, 1024), output_lens=(1, 48))
    with LLM(str(config_model_dir(config)), **(GPU_ENGINE | settings)) as llm:
        prompts, params = workload.requests(llm.engine.info.vocab_size)
        with CompileCounter() as counter:
            outs = llm.generate(prompts, params)
            torch.cuda.synchronize()
    return counter.compiled, len(outs)
