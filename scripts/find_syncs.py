"""Where the step loop makes the host wait for the GPU: every synchronizing CUDA call of an
offline run, counted by the pegboard line that made it, per step kind.

python3 scripts/find_syncs.py [--config qwen3-0.6b] [--num-seqs 256] [--max-output 1024]
                              [--detokenizer auto] [--top 25] [--json FILE]
                              [--max-running-requests N] [--cuda-graph-max-bs N]
                              [--max-model-len N] [--tp-size N]
                              [--speculative-algorithm NGRAM --speculative-num-steps 4 ...]

Why: with overlap scheduling the host should wait for the device once per step, in `resolve`
(the sampled tokens' copy). Any other synchronizing call (a pageable host-to-device copy,
`.item()`, `.tolist()` of a device tensor, `nonzero`, a stream synchronize) stalls the loop
until the GPU has finished everything queued, and `HostProfile` books that stall as host work
of whatever phase made it: on the H200 a prefill step's `forward (launch)` averages ~30 ms
(docs/benchmarks.md), far more than launching its kernels costs.

Runs `pegboard bench offline`'s nano-vllm workload (random weights, overlap and CUDA graphs
as configured by default) under `torch.cuda.set_sync_debug_mode("warn")`, turns each warning
into a count keyed by the innermost frame in pegboard's code (file:line function) and the
kind of the step it belongs to (`decode`, `mixed`, `prefill`, as `HostProfile`'s
`forward_by_kind`, set at each `ModelRunner.prepare` and kept until the next; `verify` for a
step that carries speculative drafts), and prints the top sites with their pegboard call chain.
With `--speculative-algorithm` (SGLang's flags) a verify step should wait once, in `verify`
(the target's tokens), and a plain step as without speculation. A CUDA device is needed (torch has no
sync debug mode on a CPU build). `bash scripts/device-run.sh find-syncs` runs it.
"""

from __future__ import annotations

import argparse
import json
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pegboard.core
import torch
from pegboard.core.bench.host_profile import step_kind
from pegboard.core.bench.models import random_weights_model_dir
from pegboard.core.bench.offline import OfflineWorkload
from pegboard.core.llm import LLM
from pegboard.core.speculative.flags import add_speculative_arguments, speculative_settings

PKG = str(Path(pegboard.core.__file__).parents[1])  # the pegboard checkout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-0.6b", help="bundled config name or directory")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--detokenizer", default="auto")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--json", default=None, help="also write the counts here")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--cuda-graph-max-bs", type=int, default=None)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--tp-size", type=int, default=1, help="rank 0's calls (issue 11)")
    add_speculative_arguments(p)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("find_syncs.py needs a CUDA device (no sync debug mode on a CPU build)")
    settings = {"detokenizer": args.detokenizer}
    for name in ("max_running_requests", "cuda_graph_max_bs", "max_model_len", "tp_size"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    speculative_settings(args, settings)
    llm = LLM(str(random_weights_model_dir(args.config)), load_format="dummy", **settings)
    workload = OfflineWorkload(
        num_seqs=args.num_seqs,
        max_output=args.max_output,
        max_token_id=min(10000, llm.engine.info.vocab_size - 1),
    )
    prompts, params = workload.build()
    llm.generate([prompts[0][:16]], params[0])  # warm-up: captures, first allocations

    kind = ["idle"]
    steps: Counter[str] = Counter()
    runner = llm.engine.runner
    prepare = runner.prepare

    speculation = llm.engine.speculation

    def tracked(requests, num_tokens, *rest, **kw):
        kind[0] = "verify" if speculation.drafting else step_kind(list(num_tokens))
        steps[kind[0]] += 1
        return prepare(requests, num_tokens, *rest, **kw)

    sites: Counter[tuple[str, str, str]] = Counter()

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" not in str(message):
            return
        ours = [
            f
            for f in traceback.extract_stack()[:-1]
            if f.filename.startswith(PKG) and f.filename != __file__
        ]
        here = ours[-1] if ours else None
        site = f"{_short(here.filename)}:{here.lineno} {here.name}" if here else "(outside)"
        chain = " < ".join(f.name for f in reversed(ours[-6:-1]))
        sites[(kind[0], site, chain)] += 1

    runner.prepare = tracked
    try:
        with warnings.catch_warnings():  # (restores `showwarning` too)
            warnings.simplefilter("always")
            warnings.showwarning = record
            torch.cuda.set_sync_debug_mode("warn")
            try:
                llm.generate(prompts, params)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    finally:
        del runner.prepare
        llm.close()
    rows = [
        {"kind": k, "site": s, "chain": c, "count": n, "per_step": round(n / max(steps[k], 1), 3)}
        for (k, s, c), n in sites.most_common()
    ]
    print(f"steps by kind: {dict(steps)}; synchronizing calls: {sum(sites.values())}")
    for row in rows[: args.top]:
        print(
            f"{row['count']:7d} ({row['per_step']:7.3f}/step) {row['kind']:8s} {row['site']}"
            f"  [{row['chain']}]"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"steps": dict(steps), "sites": rows}, indent=1))


def _short(filename: str) -> str:
    return filename[len(PKG) + 1 :] if filename.startswith(PKG) else filename


if __name__ == "__main__":
    main()
