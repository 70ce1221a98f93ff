"""What speculation costs when its drafts do not pay, step by step, on a CPU.

    python3 scripts/spec_switch_cpu.py [--batch-size 64] [--max-tokens 256] [--no-switch]
        [--oracle miss|perfect] [--draft-every N] [--verify-cost 2.17] [--unoverlapped-cost 1.4]

`spec-batch64`'s workload (scripts/bench_speculative.py `--oracle miss`: a warm-up request,
then `--batch-size` requests of 128 random prompt tokens decoding `--max-tokens` each, every
draft wrong) on a 1-layer, 32-wide random Qwen3 whose forward is replaced by zero logits, so
each step's time is the loop's own host work (the thread's CPU clock). Runs plain decoding,
then the oracle speculator with the on/off switch as on a GPU (the acceptance rule and the
speed rule at 1.0; `--no-switch`: both off, only the per-request back-off). Prints JSON: per
run the steps, the verify steps (some request drafted), the plain steps whose tokens were read
at once (`unoverlapped`: overlap scheduling paused because the next step might draft), the
median thread-CPU ms of an overlapped plain step, the mean of the others, and a map of the
measured run's steps (V verify, u un-overlapped plain, . overlapped plain).

The speed rule reads the wall clock, which on this CPU says nothing of a GPU's steps: the
switch is given a stand-in clock instead, on which an overlapped plain step takes 1, an
un-overlapped one `--unoverlapped-cost` and a verify step `--verify-cost` (session 8's H200
fits at batch 64 on Qwen3-0.6B: ~1.4 and ~2.2-2.6). `modelled_speedup` is the plain run's
time on that clock over the speculative run's (the same tokens): what the GPU run should show
if those costs hold. `--oracle perfect --draft-every 4`: one request in 4 drafts 4 right
tokens per step, the others none (like session 8's n-gram run at batch 64: ~17 of 64 requests
drafting per step, each verify step 2.17 plain steps for ~1.2x the tokens).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative import step as step_module
from pegboard.sdk.types import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from bench_speculative import Oracle  # noqa: E402
from profile_host_cpu import TINY  # noqa: E402


class SomeOracle(Oracle):
    """`Oracle`, drafting only for the prompts in `drafting` (all when None)."""

    name = "some_oracle"
    drafting: set[tuple[int, ...]] | None = None

    def propose(self, requests, max_tokens):
        out = super().propose(requests, max_tokens)
        if self.drafting is not None:
            for i, r in enumerate(requests):
                if tuple(r.prompt_token_ids) not in self.drafting:
                    out[i].tokens = []
        return out


class StandInClock:
    """The clock the speed rule reads (`step.time`): advanced by each step's modelled cost."""

    def __init__(self, verify: float, unoverlapped: float) -> None:
        self.now, self.cost = 0.0, {"V": verify, "u": unoverlapped, ".": 1.0}

    def perf_counter(self) -> float:
        return self.now

    def advance(self, kind: str) -> float:
        self.now += self.cost[kind]
        return self.cost[kind]


def engine(model: Path, speculate: bool, **settings) -> LLM:
    plugins = None
    if speculate:
        plugins = PluginManager()
        plugins.add(SomeOracle)
        settings["speculator"] = "some_oracle"
    llm = LLM(str(model), load_format="dummy", device="cpu", plugins=plugins, **settings)
    vocab = llm.engine.info.vocab_size

    def forward(batch):  # zero logits: every greedy token is 0, the oracle drafts 1s
        rows = batch.logits_rows.shape[0] if batch.logits_rows is not None else sum(batch.samples)
        return torch.zeros(rows, vocab)

    llm.engine.runner.forward = forward
    return llm


def traced(llm: LLM, fn, clock: StandInClock) -> list[dict]:
    """Run `fn()` recording each engine step: drafted, un-overlapped, thread CPU ms, and its
    cost on `clock` (which it advances)."""
    e, spec, rows = llm.engine, llm.engine.speculation, []
    step = e._step

    def timed():
        drafts, start = spec.num_drafts, time.thread_time()
        out = step()
        row = {"verify": spec.num_drafts > drafts, "ms": (time.thread_time() - start) * 1e3,
               "pending": e._pending is not None}  # fmt: skip
        row["units"] = clock.advance(_kind(row))
        rows.append(row)
        return out

    e._step = timed
    try:
        fn()
    finally:
        del e._step
    return rows


def summary(rows: list[dict]) -> dict:
    plain = [r["ms"] for r in rows if not r["verify"] and r["pending"]]
    verify = [r["ms"] for r in rows if r["verify"]]
    paused = [r["ms"] for r in rows if not r["verify"] and not r["pending"]]
    mean = lambda xs: round(statistics.mean(xs), 3) if xs else None  # noqa: E731
    return {
        "steps": len(rows),
        "verify_steps": len(verify),
        "unoverlapped_plain_steps": len(paused),
        "overlapped_ms_median": round(statistics.median(plain), 3) if plain else None,
        "verify_ms_mean": mean(verify),
        "unoverlapped_ms_mean": mean(paused),
        "modelled_units": round(sum(r["units"] for r in rows), 2),
        "map": "".join(map(_kind, rows)),
    }


def _kind(row: dict) -> str:
    return "V" if row["verify"] else "." if row["pending"] else "u"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--no-switch", action="store_true")
    p.add_argument("--oracle", choices=("miss", "perfect"), default="miss")
    p.add_argument("--draft-every", type=int, default=1, help="one request in N drafts")
    p.add_argument("--verify-cost", type=float, default=2.17, help="in overlapped plain steps")
    p.add_argument("--unoverlapped-cost", type=float, default=1.4)
    args = p.parse_args()
    model = Path(tempfile.mkdtemp(prefix="pegboard-tiny-"))
    (model / "config.json").write_text(json.dumps(TINY))
    rng = random.Random(0)
    prompts = [[rng.randrange(2000) for _ in range(128)] for _ in range(args.batch_size)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    clock = StandInClock(args.verify_cost, args.unoverlapped_cost)
    step_module.time = clock  # the speed rule's clock
    result = {}
    with engine(model, False) as llm:
        llm.generate(prompts[:1], params)  # warm-up
        outs = []
        run = traced(llm, lambda: outs.extend(llm.generate(prompts, params)), clock)
        result["plain"] = summary(run)
    Oracle.completions = {tuple(q): o.token_ids for q, o in zip(prompts, outs)}
    Oracle.num_draft_tokens, Oracle.vocab = 4, TINY["vocab_size"]
    Oracle.offset = 1 if args.oracle == "miss" else 0
    SomeOracle.drafting = {tuple(q) for q in prompts[:: args.draft_every]}
    settings = {"speculative_min_speedup": 1.0}  # a GPU's default
    if args.no_switch:
        settings = {"speculative_min_accept_rate": 0.0, "speculative_min_speedup": 0.0}
    with engine(model, True, **settings) as llm:
        warm = traced(llm, lambda: llm.generate(prompts[:1], params), clock)
        result["spec_warmup"] = summary(warm)
        switch = llm.engine.speculation.switch
        before, verifies = dict(switch.off_steps), llm.engine.speculation.num_verify
        result["spec"] = summary(traced(llm, lambda: llm.generate(prompts, params), clock))
        result["spec"]["switch_off_steps"] = {
            k: n - before[k] for k, n in switch.off_steps.items() if n > before[k]
        }
        # `bench_speculative.py`'s `speculation.verify_steps`: verifies summed over requests
        result["spec"]["request_verifies"] = llm.engine.speculation.num_verify - verifies
    plain, spec = result["plain"]["modelled_units"], result["spec"]["modelled_units"]
    result["modelled_speedup"] = round(plain / spec, 3)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
