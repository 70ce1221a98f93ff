"""The peer in `pegboard bench offline --peer transformers`: the same workload through
HuggingFace transformers on the same device, for a throughput figure beside pegboard's.

Several sequences run through transformers' continuous batching (`init_continuous_batching`:
a manager thread with paged KV, requests added with their own `max_new_tokens`); one sequence
runs through plain `generate`. The model is the same checkpoint, or for `--random-weights`
the same bundled config with transformers' own random initialisation, in the engine's dtype.
Every run is bounded by a timeout: what finished by then is reported, marked `timed_out`.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import TYPE_CHECKING

from pegboard.core.bench.offline import OfflineWorkload

if TYPE_CHECKING:
    import torch

PEERS = ("transformers",)


def build_peer_model(model_dir: str | Path, dtype: torch.dtype, device: torch.device):
    """A transformers causal LM of `model_dir` on `device`: its weights if the directory has
    any, else random weights drawn on the device from its `config.json`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    has_weights = any(model_dir.glob("*.safetensors")) or any(model_dir.glob("*.bin"))
    if has_weights:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    else:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.eval()


def _generation_config(model, workload: OfflineWorkload, max_new_tokens: int, **extra):
    """The workload's sampling (temperature, or greedy at 0) with EOS switched off (-1 is
    continuous batching's "no EOS"; `generate` takes `min_new_tokens` instead)."""
    from transformers import GenerationConfig

    sampled = workload.temperature > 0
    settings = {
        "max_new_tokens": max_new_tokens,
        "do_sample": sampled,
        "temperature": workload.temperature if sampled else None,
        "top_k": None,
        "top_p": None,
        "eos_token_id": -1,
        "pad_token_id": model.config.pad_token_id or 0,
    }
    return GenerationConfig(**(settings | extra))


def run_continuous_batching(
    model,
    prompts: list[list[int]],
    max_tokens: list[int],
    workload: OfflineWorkload,
    timeout: float,
) -> dict:
    """All prompts through one continuous-batching manager (warmed up first, not timed; on a
    GPU with transformers' default sizing); returns the output lengths of the requests that finished within `timeout` seconds."""
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    config = _generation_config(model, workload, max(max_tokens))
    cb_config = ContinuousBatchingConfig()
    if model.device.type == "cpu":  # sized from host RAM, its static buffers take seconds to fill
        cb_config.max_batch_tokens = 256
        cb_config.num_blocks = 64
    lengths: dict[str, int] = {}
    errors: list[str] = []
    with model.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=cb_config, block=True, timeout=10
    ) as manager:
        start = time.perf_counter()
        ids = [
            manager.add_request(p, request_id=f"req_{i}", max_new_tokens=n)
            for i, (p, n) in enumerate(zip(prompts, max_tokens))
        ]
        deadline = start + timeout
        while len(lengths) + len(errors) < len(ids) and time.perf_counter() < deadline:
            result = manager.get_result(timeout=min(1.0, max(deadline - time.perf_counter(), 0)))
            if result is None:
                if not manager.is_running():
                    errors.append("the continuous batching thread stopped")
                    break
                continue
            if result.is_finished():
                if result.error is not None:
                    errors.append(str(result.error))
                else:
                    lengths[result.request_id] = len(result.generated_tokens)
        elapsed = time.perf_counter() - start
        for rid in ids:
            if rid not in lengths:
                manager.cancel_request(rid)
    return {
        "mode": "continuous_batching",
        "output_lengths": [lengths.get(rid) for rid in ids],
        "output_tokens": sum(lengths.values()),
        "elapsed_s": elapsed,
        "errors": errors[:5],
    }


def run_generate(
    model, prompt: list[int], max_tokens: int, workload: OfflineWorkload, timeout: float
) -> dict:
    """One sequence through `generate` (after a short untimed warm-up), stopped at `timeout`."""
    import torch

    def config(n: int, **extra):
        return _generation_config(model, workload, n, eos_token_id=None, min_new_tokens=n, **extra)

    ids = torch.tensor([prompt], device=model.device)
    with torch.inference_mode():
        model.generate(ids[:, :16], generation_config=config(4))
        _synchronize(model.device)
        start = time.perf_counter()
        out = model.generate(ids, generation_config=config(max_tokens, max_time=timeout))
        _synchronize(model.device)
        elapsed = time.perf_counter() - start
    generated = out.shape[1] - ids.shape[1]
    return {
        "mode": "generate",
        "output_lengths": [generated if generated == max_tokens else None],
        "output_tokens": generated,
        "elapsed_s": elapsed,
        "errors": [],
    }


def _synchronize(device: torch.device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_peer(
    name: str,
    model_dir: str | Path,
    workload: OfflineWorkload,
    *,
    dtype: torch.dtype,
    device: torch.device,
    timeout: float = 600.0,
) -> dict:
    """Run `workload` through the peer engine `name` and return its figures, labelled.

    `finished` counts the requests done within `timeout` seconds (`timed_out` says some were
    not); `lengths_as_requested` whether each finished one generated exactly its `max_tokens`.
    Throughput counts the tokens generated by then over the timed wall time."""
    if name not in PEERS:
        raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
    import torch
    import transformers

    prompts, params = workload.build()
    max_tokens = [p.max_tokens for p in params]
    model = build_peer_model(model_dir, dtype, device)
    try:
        if len(prompts) == 1:
            run = run_generate(model, prompts[0], max_tokens[0], workload, timeout)
        else:
            run = run_continuous_batching(model, prompts, max_tokens, workload, timeout)
    finally:
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lengths = run["output_lengths"]
    done = [n for n in lengths if n is not None]
    output_tokens, elapsed = run["output_tokens"], run["elapsed_s"]
    return {
        "engine": "transformers",
        "version": transformers.__version__,
        "mode": run["mode"],
        "dtype": str(dtype).removeprefix("torch."),
        "requests": len(prompts),
        "finished": len(done),
        "timed_out": len(done) + len(run["errors"]) < len(prompts),
        "timeout_s": timeout,
        "errors": run["errors"],
        "lengths_as_requested": all(
            n == want for n, want in zip(lengths, max_tokens) if n is not None
        ),
        "output_tokens": output_tokens,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(output_tokens / elapsed, 1) if elapsed > 0 else 0.0,
    }
