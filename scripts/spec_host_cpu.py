"""Host work per engine step of speculative decoding at batch 64 on a CPU (issue 14).

A tiny random Llama (hidden 64, 2 layers) so that the model's own compute is small, 64 requests
at once, greedy, `--max-tokens` each. Variants: `plain` (no speculator), `spec_off` (the miss
oracle with the batch rule at 1: never drafts; the speed rule's bookkeeping on, as on CUDA),
`miss` (every draft rejected, the switch as on CUDA: acceptance and speed rules),
`ngram` (drafting every step it can: `--speculative-min-speedup 0 --speculative-min-accept-rate
0`) and `perfect` (the plain run's tokens as drafts, every draft accepted), `eagle_off` (a random
EAGLE-3 head with the batch rule at 1, as `spec_off`: the target's features are still handed
to the head every step). Per variant: this
thread's CPU µs per step (`time.thread_time`, so the team's other processes do not count), by
phase (`HostProfile`), the forward (the model's compute on a CPU) and the rest (the host's
work, which a GPU does not hide at this batch size), by step kind.

    PYTHONPATH=$PWD python scripts/spec_host_cpu.py [--variants plain,spec_off] [--repeat 3]
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_speculative import Oracle  # noqa: E402  (drafts the plain run's tokens, +1: all wrong)
from fixtures.tiny_models import build_tiny_model  # noqa: E402
from pegboard.core.bench.gc_time import GcTime  # noqa: E402
from pegboard.core.bench.host_profile import HostProfile  # noqa: E402
from pegboard.core.llm import LLM  # noqa: E402
from pegboard.core.plugin_manager import PluginManager  # noqa: E402
from pegboard.sdk.types import Request, SamplingParams  # noqa: E402
from test_speculative_eagle import build_eagle3_head  # noqa: E402

FORWARD = "forward (launch)"


def run(model, prompts, params, plugins=None, profile=None, **settings):
    """The prompts' completions, the decode steps' `HostProfile` report (prefill steps are
    run before the profile opens) and the speculation stats."""
    with LLM(model, dtype="float32", device="cpu", plugins=plugins, **settings) as llm:
        llm.generate(prompts[:2], params)  # warm-up
        e = llm.engine
        requests = [Request(list(q), params) for q in prompts]
        for r in requests:
            e.add_request(r)
        while any(r.num_output_tokens == 0 for r in requests):
            e.step()
        with HostProfile(e, clock=time.thread_time) as prof, GcTime(time.thread_time) as gc_time:
            if profile is not None:
                profile.enable()
            while e.has_work():
                e.step()
            if profile is not None:
                profile.disable()
        report = prof.report()
        report["gc"] = gc_time.report()
        return requests, report, e.speculation.stats()


def summary(report) -> dict:
    ms = report["ms_per_step"]
    steps = report["steps"]
    total = ms.get("step (total)", 0.0)
    fwd = ms.get(FORWARD, 0.0)
    return {
        "steps": steps,
        "host_us_per_step": round((report["host_ms_per_step"] - fwd) * 1e3, 1),
        "forward_us_per_step": round(fwd * 1e3, 1),
        "step_total_us": round(total * 1e3, 1),
        "host_us_by_kind": {
            k: v["host_ms_per_step"] * 1e3 for k, v in report["host_ms_by_kind"].items()
        },
        "forward_us_by_kind": {
            k: v["forward_ms_per_step"] * 1e3 for k, v in report["forward_by_kind"].items()
        },
        "gc": report["gc"],
        "top_phases_us": {k: round(v * 1e3, 1) for k, v in list(ms.items())[:14]},
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=1, help="runs per variant (the best is kept)")
    p.add_argument("--variants", default="plain,spec_off,miss,ngram,perfect")
    p.add_argument("--cprofile", default=None, help="a variant to run under cProfile too")
    args = p.parse_args()
    root = Path(tempfile.mkdtemp())
    model = str(build_tiny_model(root / "tiny", "llama"))
    head = {"eagle": {"model_path": str(build_eagle3_head(root / "eagle3"))}}
    prompts = [
        [1 + (i * 7 + j * 13) % 500 for j in range(16 + i % 8)] for i in range(args.batch_size)
    ]
    ngram_prompts = [(q[:8] * 4)[: len(q)] for q in prompts]  # repeated phrases: n-gram's
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    plain, _, _ = run(model, prompts, params)
    Oracle.completions = {tuple(q): o.output_token_ids for q, o in zip(prompts, plain)}
    Oracle.num_draft_tokens, Oracle.vocab = 4, 512
    pm = PluginManager()
    pm.add(Oracle)
    rules = {"speculative_min_speedup": 1.0}  # the speed rule as on CUDA
    always = {"speculative_min_speedup": 0.0, "speculative_min_accept_rate": 0.0}
    variants = {
        "plain": (prompts, None, {}),
        "spec_off": (prompts, pm, {"speculator": "oracle", "speculative_disable_by_batch_size": 1, **rules}),
        "miss": (prompts, pm, {"speculator": "oracle", **rules}),
        "ngram": (ngram_prompts, None, {"speculator": "ngram", "plugin_options": {"ngram": {"num_draft_tokens": 4}}, **always}),
        "perfect": (prompts, pm, {"speculator": "oracle", **always}),
        "eagle_off": (prompts, None, {"speculator": "eagle", "plugin_options": head, "speculative_disable_by_batch_size": 1, **rules}),
    }  # fmt: skip
    result = {}
    for name in args.variants.split(","):
        qs, plugins, settings = variants[name]
        Oracle.offset = 1 if name in ("miss", "spec_off") else 0
        best = None
        for _ in range(args.repeat):
            _, report, stats = run(model, qs, params, plugins, **settings)
            s = summary(report)
            if best is None or s["host_us_per_step"] < best["host_us_per_step"]:
                best = s
        best["accept_length"] = round(stats["spec_accept_length"], 2)
        best["switch_off_steps"] = stats["spec_switch_off_steps"]
        result[name] = best
        if name == args.cprofile:
            prof = cProfile.Profile(time.thread_time)
            run(model, qs, params, plugins, prof, **settings)
            stats = pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime")
            stats.print_stats(int(os.environ.get("CPROFILE_LINES", "40")))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
