"""Where a speculation probe's time goes at batch 64 (issue 14).

Session 18 measured Qwen3-0.6B (random weights) with a random EAGLE-3 head at batch 64 on the
H200: the switch turned drafting off as it should, yet the run lost 14 % to plain, almost all
of it in three verify steps of 18-34 ms each (a plain step: 1.9 ms). This script runs that
engine once and, inside each `propose` that drafts, times the EAGLE speculator's parts with the
device synchronized before and after each (the step around them is un-overlapped already):
`_catch_up`'s eager head forward (and its parts: `HeadKV.batch` with the attention's prepare,
the attention, the linears, norms and rope; `head.step` less those is the embedding lookup,
concatenations and SiLU), the drafting graph's `run`, `_ingest`, the logged features'
`distribute`; and the rest of such a step: the verify batch's `runner.prepare` and `forward`
(its graph replay, waited for), the core's `_verify` and the step's `_resolve`. It also counts
the Triton specializations compiled after the warm-up (`CompileCounter`), with their kernels. Prints one line per verify step (and the batch's
first step, its prefill) and the compiles.

`--torch-profile`: the run under the torch profiler, each engine step a `record_function`
range; then, over the steps printed, the host's longest operations (CUDA runtime calls
included: a module loaded lazily at a kernel's first launch shows as a long launch) and the
device's kernels, by total time.

    python3 scripts/profile_spec_probe.py [--config qwen3-0.6b] [--batch-size 64] [--torch-profile]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))


def timed(owner, name: str, record: dict, sync, label: str | None = None, when=None) -> None:
    """Replace `owner.name` by a version adding its ms (device synchronized) to `record`
    under `label` (default `name`); with `when`, only in calls where `when()` is true (the
    others run untouched)."""
    original = getattr(owner, name)
    label = label or name

    def wrapper(*args, **kwargs):
        if when is not None and not when():
            return original(*args, **kwargs)
        sync()
        t = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sync()
            record[label] += (time.perf_counter() - t) * 1e3

    setattr(owner, name, wrapper)


STEP = "engine step "


def print_steps_profile(profiler, numbers: set[int], top: int = 15) -> None:
    """Host operations and device kernels inside the engine steps `numbers`, by total ms."""
    events = profiler.events()
    ranges = [e.time_range for e in events
              if e.name.startswith(STEP) and int(e.name[len(STEP):]) in numbers]  # fmt: skip
    host: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    device: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for e in events:
        if e.name.startswith(STEP):
            continue
        start = e.time_range.start
        if not any(r.start <= start <= r.end + 2000 for r in ranges):  # (+2 ms: the GPU's lag)
            continue
        on_device = e.device_type != torch.autograd.DeviceType.CPU
        table, ms = (device, e.time_range.elapsed_us() / 1e3) if on_device else (
            host, e.self_cpu_time_total / 1e3)  # fmt: skip
        table[e.name][0] += 1
        table[e.name][1] += ms
    for title, table in (("host (self ms)", host), ("device (ms)", device)):
        print(f"{title} over steps {sorted(numbers)}:")
        for name, (n, ms) in sorted(table.items(), key=lambda kv: -kv[1][1])[:top]:
            print(f"  {ms:9.3f} {n:6d}  {name[:90]}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--head", default="/tmp/eagle3-probe-head")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None)
    p.add_argument("--torch-profile", action="store_true", help="ops and kernels of those steps")
    args = p.parse_args()

    from pegboard.core.bench.models import random_weights_model_dir
    from pegboard.core.llm import LLM
    from pegboard.core.speculative.hidden import TargetHidden
    from pegboard.plugins.speculative.eagle import EagleSpeculator
    from pegboard.sdk.types import SamplingParams
    from profile_spec_host import random_eagle3_head

    model = random_weights_model_dir(args.config)
    random_eagle3_head(Path(args.head), json.loads((model / "config.json").read_text()))
    cuda = torch.cuda.is_available() and args.device != "cpu"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    settings = dict(
        load_format="dummy", device=args.device, speculator="eagle",
        plugin_options={"eagle": {"model_path": args.head, "num_draft_tokens": 4}},
    )  # fmt: skip
    if cuda:
        settings["cuda_graph_max_bs"] = args.batch_size
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    rng = torch.Generator().manual_seed(0)
    with LLM(str(model), **settings) as llm:
        vocab = llm.engine.info.vocab_size
        prompts = torch.randint(10, vocab - 10, (args.batch_size, args.input_len), generator=rng)
        prompts = prompts.tolist()
        llm.generate(prompts[:1], params)  # the benchmark's warm-up (batch 1)
        steps: list[dict] = []
        part: dict[str, float] = defaultdict(float)
        for owner, name in [
            (EagleSpeculator, "_catch_up"),
            (EagleSpeculator, "_ingest"),
            (EagleSpeculator, "_feed"),
            (TargetHidden, "distribute"),
        ]:
            timed(owner, name, part, sync)
        spec = llm.engine.speculation.speculator
        if getattr(spec, "graphs", None) is not None:
            timed(spec.graphs, "run", part, sync)
        # the eager head forward's parts (drafting graphs replay without calling these)
        head, kv = spec.head, spec.kv
        timed(head, "step", part, sync, "head.step")
        timed(kv, "batch", part, sync, "kv.batch (host, attention.prepare)")
        timed(kv.attention, "forward", part, sync, "head attention (store + extend)")
        if head.linear is not None:
            timed(head, "linear", part, sync, "head linears (fused)")
        for norm in ("input_layernorm", "hidden_norm", "post_attention_layernorm"):
            if getattr(head, norm, None) is not None:
                timed(getattr(head, norm), "forward", part, sync, "head norms")
        if head.rotary.kernel is not None:
            timed(head.rotary, "rotate_in_place", part, sync, "head rope")
        engine = llm.engine
        step = engine.step
        timed(engine.speculation, "propose", part, sync)  # (the core's: hand-out, the hook)
        # the rest of a step that drafts: the verify batch's prepare and forward (the verify
        # graph's replay, waited for), the core's verify (the sample hook's verification, the
        # roll-back), and the resolve of the step before it
        drafting = lambda: engine.speculation.drafting  # noqa: E731
        timed(engine.runner, "prepare", part, sync, "runner.prepare", drafting)
        timed(engine.runner, "forward", part, sync, "runner.forward (verify)", drafting)
        timed(engine, "_verify", part, sync, "engine._verify")
        timed(engine, "_resolve", part, sync, "engine._resolve", drafting)

        def timed_step():
            verified = engine.speculation.num_verify
            part.clear()
            t = time.perf_counter()
            with torch.profiler.record_function(f"{STEP}{engine.num_steps + 1}"):
                out = step()
            ms = (time.perf_counter() - t) * 1e3
            if engine.speculation.num_verify > verified or part.get("_feed") or not steps:
                steps.append({"step": engine.num_steps, "ms": round(ms, 3),
                              **{k: round(v, 3) for k, v in part.items()}})  # fmt: skip
            return out

        engine.step = timed_step
        counter = None
        if cuda:
            from pegboard.core.kernels.jit_keys import CompileCounter

            counter = CompileCounter().__enter__()
        profiler = contextlib.nullcontext()
        if args.torch_profile:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            profiler = torch.profiler.profile(activities=activities)
        t0 = time.perf_counter()
        with profiler:
            outs = llm.generate(prompts, params)
        elapsed = time.perf_counter() - t0
        if counter is not None:
            counter.__exit__(None, None, None)
        del engine.step
    tokens = sum(len(o.token_ids) for o in outs)
    for s in steps:
        print(" ".join(f"{k}={v}" for k, v in s.items()))
    compiled = counter.compiled if counter else []
    print(f"{tokens} tokens in {elapsed:.3f} s; {len(compiled)} Triton specializations compiled")
    for kernel, description in compiled:
        print(f"  {kernel}: {description[:300]}")
    if args.torch_profile:
        print_steps_profile(profiler, {s["step"] for s in steps})
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": steps, "compiled": compiled}, indent=1))


if __name__ == "__main__":
    main()
