"""What speculation costs when every draft is rejected, step by step, on a CPU.

    python3 scripts/spec_switch_cpu.py [--batch-size 64] [--max-tokens 256] [--no-switch]

`spec-batch64`'s workload (scripts/bench_speculative.py `--oracle miss`: a warm-up request,
then `--batch-size` requests of 128 random prompt tokens decoding `--max-tokens` each, every
draft wrong) on a 1-layer, 32-wide random Qwen3 whose forward is replaced by zero logits, so
each step's time is the loop's own host work (the thread's CPU clock). Runs plain decoding,
then the oracle speculator with the on/off switch (`--no-switch`: acceptance rule off, only the
per-request back-off). Prints JSON: per run the steps, the verify steps (some request drafted),
the plain steps whose tokens were read at once (`unoverlapped`: overlap scheduling paused
because the next step might draft), the median thread-CPU ms of an overlapped plain step, the
mean of the others, and a map of the measured run's steps (V verify, u un-overlapped plain,
. overlapped plain). On a GPU a verify step costs ~1.5-3 plain steps and an un-overlapped
plain step ~1.5 (docs/speculative.md): the counts are what a 256-step run pays.
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
from pegboard.sdk.types import SamplingParams

sys.path.insert(0, str(Path(__file__).parent))
from bench_speculative import Oracle  # noqa: E402
from profile_host_cpu import TINY  # noqa: E402


def engine(model: Path, speculate: bool, **settings) -> LLM:
    plugins = None
    if speculate:
        plugins = PluginManager()
        plugins.add(Oracle)
        settings["speculator"] = "oracle"
    llm = LLM(str(model), load_format="dummy", device="cpu", plugins=plugins, **settings)
    vocab = llm.engine.info.vocab_size

    def forward(batch):  # zero logits: every greedy token is 0, the oracle drafts 1s
        rows = batch.logits_rows.shape[0] if batch.logits_rows is not None else sum(batch.samples)
        return torch.zeros(rows, vocab)

    llm.engine.runner.forward = forward
    return llm


def traced(llm: LLM, fn) -> list[dict]:
    """Run `fn()` recording each engine step: drafted, un-overlapped, thread CPU ms."""
    e, spec, rows = llm.engine, llm.engine.speculation, []
    step = e._step

    def timed():
        drafts, start = spec.num_drafts, time.thread_time()
        out = step()
        rows.append({"verify": spec.num_drafts > drafts, "ms": (time.thread_time() - start) * 1e3,
                     "pending": e._pending is not None})  # fmt: skip
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
        "map": "".join("V" if r["verify"] else "." if r["pending"] else "u" for r in rows),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--no-switch", action="store_true")
    args = p.parse_args()
    model = Path(tempfile.mkdtemp(prefix="pegboard-tiny-"))
    (model / "config.json").write_text(json.dumps(TINY))
    rng = random.Random(0)
    prompts = [[rng.randrange(2000) for _ in range(128)] for _ in range(args.batch_size)]
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    result = {}
    with engine(model, False) as llm:
        llm.generate(prompts[:1], params)  # warm-up
        outs = []
        result["plain"] = summary(traced(llm, lambda: outs.extend(llm.generate(prompts, params))))
    Oracle.completions = {tuple(q): o.token_ids for q, o in zip(prompts, outs)}
    Oracle.num_draft_tokens, Oracle.offset, Oracle.vocab = 4, 1, TINY["vocab_size"]
    settings = {"speculative_min_accept_rate": 0.0} if args.no_switch else {}
    with engine(model, True, **settings) as llm:
        result["spec_warmup"] = summary(traced(llm, lambda: llm.generate(prompts[:1], params)))
        switch = llm.engine.speculation.switch
        before, verifies = switch.num_off_steps, llm.engine.speculation.num_verify
        result["spec"] = summary(traced(llm, lambda: llm.generate(prompts, params)))
        result["spec"]["switch_off_steps"] = switch.num_off_steps - before
        # `bench_speculative.py`'s `speculation.verify_steps`: verifies summed over requests
        result["spec"]["request_verifies"] = llm.engine.speculation.num_verify - verifies
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
