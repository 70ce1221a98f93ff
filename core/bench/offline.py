"""`pegboard bench offline`: the nano-vllm throughput workload through the offline engine.

N sequences of random token ids, input and output lengths uniform in a range, EOS ignored;
throughput = output tokens / wall time (as nano-vllm's bench.py, whose seed-0 workload has
142,827 input and 133,966 output tokens at the defaults).
"""

from __future__ import annotations

import contextlib
import random
import time
from dataclasses import asdict, dataclass

from pegboard.sdk.types import SamplingParams


@dataclass
class OfflineWorkload:
    num_seqs: int = 256
    min_input: int = 100
    max_input: int = 1024
    min_output: int = 100
    max_output: int = 1024
    max_token_id: int = 10000
    temperature: float = 0.6
    seed: int = 0

    def build(self) -> tuple[list[list[int]], list[SamplingParams]]:
        """Prompts and params, drawn in nano-vllm's order so the same seed gives its workload."""
        rng = random.Random(self.seed)
        prompts = [
            [
                rng.randint(0, self.max_token_id)
                for _ in range(rng.randint(self.min_input, self.max_input))
            ]
            for _ in range(self.num_seqs)
        ]
        params = [
            SamplingParams(
                temperature=self.temperature,
                ignore_eos=True,
                max_tokens=rng.randint(self.min_output, self.max_output),
            )
            for _ in range(self.num_seqs)
        ]
        return prompts, params


def run_offline(
    llm,
    workload: OfflineWorkload,
    progress: bool = True,
    profile_host: bool = False,
    torch_profile: str | None = None,
    torch_profile_steps: tuple[int, int] = (40, 8),
) -> dict:
    """Warm up, then time one `generate` of the whole workload; return the figures (with
    `profile_host`, also the host's ms per step by phase: `pegboard.core.bench.host_profile`;
    with `torch_profile` a directory, a torch-profiler window of a few steps is written there:
    `pegboard.core.bench.torch_profile`, `torch_profile_steps` = (steps skipped, steps recorded))."""
    from pegboard.core.bench.dispatch import plugin_layer_share
    from pegboard.core.bench.gc_time import GcTime, StepTimes
    from pegboard.core.bench.host_profile import HostProfile

    prompts, params = workload.build()
    llm.generate([prompts[0][:16]], SamplingParams(max_tokens=4, ignore_eos=True))
    steps_before = llm.engine.num_steps
    spec_before = llm.engine.speculation.stats()  # acceptance figures of this run only
    from pegboard.core.bench.torch_profile import TorchProfile

    kernels = (
        TorchProfile(llm.engine, torch_profile, *torch_profile_steps)
        if torch_profile
        else contextlib.nullcontext()
    )
    with (
        kernels,
        HostProfile(llm.engine) if profile_host else contextlib.nullcontext() as profile,
        GcTime() as gc_time,
        StepTimes(llm.engine) as step_times,
    ):
        start = time.perf_counter()
        outs = llm.generate(prompts, params, progress=progress)
        elapsed = time.perf_counter() - start
    steps = llm.engine.num_steps - steps_before
    input_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(o.token_ids) for o in outs)
    moe = getattr(llm.engine, "moe", None)  # MoE models (pegboard.core.moe.runtime)
    return {
        "workload": asdict(workload),
        "requests": len(outs),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(output_tokens / elapsed, 1),
        "total_tok_s": round((input_tokens + output_tokens) / elapsed, 1),
        "preemptions": sum(o.num_preemptions for o in outs),
        "steps": steps,
        "overlap": not llm.engine.config.disable_overlap,
        "cuda_graphs": llm.engine.runner.cuda_graphs is not None,
        "mixed_graphs": mixed.report() if (mixed := llm.engine.runner.mixed_graphs) else None,
        "plugin_layer": plugin_layer_share(elapsed / max(steps, 1)),
        "speculation": llm.engine.speculation.report(spec_before),
        "moe": moe.report() if moe is not None else None,  # placement, balancedness
        "gc": gc_time.report(),  # collections inside the timed run (core/bench/gc_time.py)
        "step_ms": step_times.report(),  # a collection in the loop: a long step
    } | ({"host_profile": profile.report()} if profile else {})
