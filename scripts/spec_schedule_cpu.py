"""The step schedule of `spec-batch64`'s `spec_no_switch` runs on a CPU: which steps verify
drafts, which plain steps read their tokens at once (un-overlapped) and which overlap, and the
host's thread-CPU ms per step by kind (`HostProfile`; the tiny model's forward included).

A tiny random Qwen3 (32 wide, 2,048-token vocabulary), 64 random prompts of 128 tokens, 256
greedy tokens each, EOS ignored; speculation with both switch rules off, as
`bench_speculative.py --compare-switch` runs it: `miss` drafts the plain run's next tokens plus
one (every draft rejected; the schedule does not depend on the model, so it is the H200's),
`ngram` drafts by n-gram lookup (its acceptance depends on the model's outputs). Runs on
another tree with `PYTHONPATH=DIR` (DIR/pegboard that checkout), so two trees' schedules and
host work compare.

    PYTHONPATH=DIR python3 scripts/spec_schedule_cpu.py [--speculator miss|ngram]
        [--switch none|default|batch] [--plain] [--stub-forward]

`--switch` picks the on/off switch as `spec-batch64` runs it: `none` (both rules off, drafting
wherever it can: `spec_no_switch`, the default), `default` (the acceptance rule at its default
and the speed rule at 1.0, as on CUDA: `spec`) or `batch` (the batch-size rule at 1, no step
drafts: `spec_off`). `--plain` adds the engine without a speculator as `plain`. Per run, besides
the counts: `host_fed_steps`, the steps whose inputs came from the host because the step before
read its tokens at once (on a GPU the device idles while such a step is prepared: the host's
work is exposed), and the host's thread-CPU ms per step of each kind (`ms_by_kind`, as
`bench_speculative.py --step-times` sorts them: `steady` = a plain step that overlaps, after
one that overlapped too: the switched-off step proper, to compare with `plain`'s; `flip` = a
plain step that read its tokens at once, the prefill and the last step among them; `host_fed`;
`verify`). `--stub-forward` replaces the model's forward by zero logits (every target token 0:
the miss oracle still misses, n-gram drafts are all accepted), so those ms are the loop's own
host work and not the tiny model's arithmetic.
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from pegboard.core.bench.host_profile import HostProfile
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, SamplingParams

TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 2048, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "rope_theta": 1000000, "tie_word_embeddings": True,
    "torch_dtype": "float32", "eos_token_id": 2, "bos_token_id": 1,
}  # fmt: skip


class MissOracle(Speculator):
    """Drafts the plain run's next 4 tokens plus one: every draft is rejected."""

    name = "oracle"
    completions: dict[tuple[int, ...], list[int]] = {}

    def chain_length(self) -> int:
        return 4

    calls = 0  # `propose` calls (a switched-off step must make none)

    def propose(self, requests, max_tokens):
        MissOracle.calls += 1
        out = []
        for r, k in zip(requests, max_tokens):
            ref = self.completions.get(tuple(r.prompt_token_ids), [])
            done = r.num_output_tokens
            out.append(Drafts([(t + 1) % TINY["vocab_size"] for t in ref[done : done + min(k, 4)]]))
        return out


SWITCHES = {
    "none": {"speculative_min_accept_rate": 0.0, "speculative_min_speedup": 0.0},
    "default": {"speculative_min_speedup": 1.0},  # the acceptance rule at its default too
    "batch": {"speculative_disable_by_batch_size": 1},
}


def schedule(llm, prompts, params) -> dict:
    """Run `prompts` once, step by step: the counts of each kind of step, and the host's
    thread-CPU ms per step of each kind."""
    engine = llm.engine
    kinds, step = [], engine.step

    def step_kind():
        before, asked = engine.speculation.num_verify, _asked(engine)
        start = time.thread_time()
        out = step()
        ms = (time.thread_time() - start) * 1e3
        verified = engine.speculation.num_verify - before
        pending = engine._pending is not None  # its tokens are read by the next step
        kind = "verify" if verified else "overlapped" if pending else "plain"
        kinds.append((kind, verified, ms, _asked(engine) - asked))
        return out

    engine.step = step_kind
    with HostProfile(engine, clock=time.thread_time) as profile:
        llm.generate(prompts, params)
    del engine.step
    report = profile.report()
    counts = collections.Counter(k for k, *_ in kinds)
    ms: dict[str, list[float]] = collections.defaultdict(list)
    fed = 0
    for i, (kind, _, t, _) in enumerate(kinds):
        before = kinds[i - 1][0] if i else None
        host_fed = kind == "overlapped" and before in ("verify", "plain")
        fed += before in ("verify", "plain")  # inputs from the host: the device idled
        ms[{"plain": "flip"}.get(kind, "host_fed" if host_fed else "steady")
           if kind != "verify" else kind].append(t)  # fmt: skip
    return {
        "steps": len(kinds),
        "verify_steps": counts["verify"],
        "unoverlapped_plain_steps": counts["plain"],  # the prefill step among them
        "overlapped_steps": counts["overlapped"],
        "host_fed_steps": fed,
        "request_verifies": sum(n for _, n, *_ in kinds),
        "speculator_calls_in_plain_steps": sum(a for k, _, _, a in kinds if k != "verify"),
        "first_steps": [k if not n else f"verify {n}" for k, n, *_ in kinds[:24]],
        "not_overlapped_at": [(i, k, n) for i, (k, n, *_) in enumerate(kinds) if k != "overlapped"],
        "ms_by_kind": {k: _summary(v) for k, v in sorted(ms.items())},
        "host_ms_by_kind": report.get("host_ms_by_kind"),
    }


def stub_forward(llm) -> None:
    """The model's forward as zero logits of the right shape (`--stub-forward`)."""
    vocab = llm.engine.info.vocab_size

    def forward(batch):
        rows = batch.logits_rows.shape[0] if batch.logits_rows is not None else sum(batch.samples)
        return torch.zeros(rows, vocab)

    llm.engine.runner.forward = forward


def _asked(engine) -> int:
    speculator = engine.speculation.speculator
    return getattr(speculator, "calls", 0)


def _summary(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {
        "steps": len(ms),
        "median": round(ms[len(ms) // 2], 3),
        "mean": round(sum(ms) / len(ms), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speculator", choices=("miss", "ngram"), default="miss")
    p.add_argument("--switch", choices=tuple(SWITCHES), default="none")
    p.add_argument("--plain", action="store_true", help="also the engine without a speculator")
    p.add_argument("--stub-forward", action="store_true", help="zero logits: host work only")
    args = p.parse_args()
    model = Path(tempfile.mkdtemp(prefix="pegboard-tiny-"))
    (model / "config.json").write_text(json.dumps(TINY))
    rng = random.Random(0)
    prompts = [[rng.randrange(TINY["vocab_size"]) for _ in range(128)] for _ in range(64)]
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    base = {"load_format": "dummy", "device": "cpu"}
    result = {}
    with LLM(str(model), **base) as llm:
        if args.stub_forward:
            stub_forward(llm)
        llm.generate(prompts[:1], params)
        if args.plain:
            result["plain"] = schedule(llm, prompts, params)
        plain = llm.generate(prompts, params)
    settings = base | SWITCHES[args.switch]
    plugins = None
    if args.speculator == "miss":
        MissOracle.completions = {tuple(q): o.token_ids for q, o in zip(prompts, plain)}
        plugins = PluginManager()
        plugins.add(MissOracle)
        settings["speculator"] = "oracle"
    else:
        settings |= {"speculator": "ngram", "plugin_options": {"ngram": {"num_draft_tokens": 4}}}
    with LLM(str(model), plugins=plugins, **settings) as llm:
        if args.stub_forward:
            stub_forward(llm)
        llm.generate(prompts[:1], params)  # the warm-up bench_speculative runs
        switch = llm.engine.speculation.switch
        before = dict(switch.off_steps)
        run = result[f"{args.speculator} switch={args.switch}"] = schedule(llm, prompts, params)
        run["switch_off_steps"] = {k: n - before[k] for k, n in switch.off_steps.items()}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
