"""The shared-prefix benchmark: prefix-cache hit rate, prefill tokens saved and throughput.

N groups x M requests; the requests of a group share a P-token prefix (a system prompt, a
few-shot preamble) and each has its own random suffix. Requests arrive all at once, in one of
three orders: shuffled (SGLang's generated-shared-prefix benchmark does this), groups
interleaved (A1 B1 C1 ... A2 B2 ...) or one group after the other. Greedy, EOS ignored, so
every configuration generates the same tokens.

Shapes (`--shape`; single flags override a shape's values):
- `generated-shared-prefix` (default): SGLang's `bench_serving --dataset-name
  generated-shared-prefix` defaults — 64 groups x 16 prompts, a 2048-token system prompt,
  128-token questions, 256 output tokens, shuffled. Long enough on an H200 to separate radix
  from paged caching and cache-aware from round-robin routing.
- `small`: 8 groups x 16, 512-token prefixes, 16-128-token suffixes, 64 output tokens,
  interleaved (the earlier default; docs/benchmarks.md's 2026-11-21 rows).

    pegboard bench prefix --random-weights --config qwen3-0.6b --kv-cache radix --scheduler lpm
    pegboard bench prefix --model DIR --kv-cache paged --shape small --groups 4 --per-group 8

With `--router-policies` the same workload goes over HTTP through `pegboard serve --dp-size N`
once per routing policy (`core/bench/routing.py`).

or from Python: `run_prefix_bench(lambda: LLM(model_dir, kv_cache="radix"), PrefixWorkload())`.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Literal

from pegboard.sdk.types import SamplingParams


@dataclass
class PrefixWorkload:
    """N groups x M requests sharing a P-token prefix per group, random suffixes (defaults:
    SGLang's generated-shared-prefix shape)."""

    num_groups: int = 64
    per_group: int = 16
    prefix_len: int = 2048
    min_suffix: int = 128
    max_suffix: int = 128
    output_len: int = 256
    order: Literal["shuffled", "interleaved", "grouped"] = "shuffled"
    max_token_id: int = 10000
    seed: int = 0

    def build(self) -> tuple[list[list[int]], list[SamplingParams]]:
        """Prompts in arrival order, and their (greedy, EOS-ignoring) sampling params."""
        rng = random.Random(self.seed)
        prefixes = [
            [rng.randint(1, self.max_token_id) for _ in range(self.prefix_len)]
            for _ in range(self.num_groups)
        ]
        groups = [
            [
                prefixes[g]
                + [
                    rng.randint(1, self.max_token_id)
                    for _ in range(rng.randint(self.min_suffix, self.max_suffix))
                ]
                for _ in range(self.per_group)
            ]
            for g in range(self.num_groups)
        ]
        if self.order == "grouped":
            prompts = [p for group in groups for p in group]
        else:
            prompts = [groups[g][i] for i in range(self.per_group) for g in range(self.num_groups)]
        if self.order == "shuffled":
            rng.shuffle(prompts)
        params = SamplingParams(max_tokens=self.output_len, temperature=0.0, ignore_eos=True)
        return prompts, [params] * len(prompts)


def run_prefix_bench(
    llm_factory: Callable[[], object],
    workload: PrefixWorkload | None = None,
    *,
    warmup: bool = True,
    progress: bool = False,
) -> dict:
    """Build an `LLM` with `llm_factory`, run the workload once (timed) and return the
    figures: hit rate (`prefix_hit_tokens / prefix_query_tokens` over the run), prefill
    tokens saved (`prefix_hit_tokens`) and computed, output and total tok/s. The LLM is
    closed afterwards. Caches without prefix reuse report 0 hits."""
    workload = workload or PrefixWorkload()
    prompts, params = workload.build()
    llm = llm_factory()
    try:
        if warmup:  # tokens no prompt starts with, so the warm-up leaves nothing to hit
            llm.generate([[0] * 8], SamplingParams(max_tokens=2, ignore_eos=True))
        kv = llm.engine.kv
        before = kv.stats()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, progress=progress)
        elapsed = time.perf_counter() - start
        after = llm.engine.kv.stats()
        plugins = {slot: llm.engine.plugins.active(slot).name for slot in ("scheduler", "kv_cache")}
    finally:
        llm.close()
    delta = {k: after[k] - before.get(k, 0) for k in after if k.startswith(("prefix_", "host_"))}
    hits = int(delta.get("prefix_hit_tokens", 0))
    queries = int(delta.get("prefix_query_tokens", 0))
    input_tokens = sum(len(p) for p in prompts)
    output_tokens = sum(len(o.token_ids) for o in outs)
    return {
        "workload": asdict(workload),
        "plugins": plugins,
        "requests": len(outs),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "prefix_hit_tokens": hits,
        "prefix_query_tokens": queries,
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "prefill_tokens_saved": hits,
        "prefill_tokens_computed": (queries - hits) if queries else input_tokens,
        "host_hit_tokens": int(delta.get("host_hit_tokens", 0)),
        "evicted_pages": int(after.get("evicted_pages", 0) - before.get("evicted_pages", 0)),
        "preemptions": sum(o.num_preemptions for o in outs),
        "elapsed_s": round(elapsed, 3),
        "output_tok_s": round(output_tokens / elapsed, 1),
        "total_tok_s": round((input_tokens + output_tokens) / elapsed, 1),
    }


#: Named workload shapes (`--shape`); `PrefixWorkload()` is the first.
SHAPES: dict[str, PrefixWorkload] = {
    "generated-shared-prefix": PrefixWorkload(),
    "small": PrefixWorkload(
        num_groups=8,
        per_group=16,
        prefix_len=512,
        min_suffix=16,
        max_suffix=128,
        output_len=64,
        order="interleaved",
    ),  # fmt: skip
}
#: Flag destination -> `PrefixWorkload` field, for the flags that override a shape.
_FLAG_FIELDS = {
    "groups": "num_groups",
    "per_group": "per_group",
    "prefix_len": "prefix_len",
    "min_suffix": "min_suffix",
    "max_suffix": "max_suffix",
    "output_len": "output_len",
    "order": "order",
    "max_token_id": "max_token_id",
    "workload_seed": "seed",
}


def add_workload_arguments(p: argparse.ArgumentParser) -> None:
    w = p.add_argument_group("workload", "a --shape, then any of its values overridden")
    w.add_argument(
        "--shape",
        choices=list(SHAPES),
        default="generated-shared-prefix",
        help="generated-shared-prefix (default): 64 groups x 16, 2048-token prefixes, "
        "128-token questions, 256 output tokens, shuffled (SGLang's); small: 8 x 16, 512, "
        "16-128, 64, interleaved",
    )
    for flag in ("--groups", "--per-group", "--prefix-len", "--min-suffix", "--max-suffix"):
        w.add_argument(flag, type=int, default=None)
    w.add_argument("--output-len", type=int, default=None)
    w.add_argument("--order", choices=["shuffled", "interleaved", "grouped"], default=None)
    w.add_argument("--max-token-id", type=int, default=None)
    w.add_argument("--workload-seed", type=int, default=None)
    from pegboard.core.bench.routing import add_router_arguments

    add_router_arguments(p)


def workload_from_args(args: argparse.Namespace) -> PrefixWorkload:
    """The `--shape`'s workload with the values of the flags that were given."""
    given = {f: getattr(args, dest) for dest, f in _FLAG_FIELDS.items()}
    return replace(SHAPES[args.shape], **{k: v for k, v in given.items() if v is not None})
