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
"""

from __future__ import annotations

import argparse
import collections
import json
import random
import tempfile
import time
from pathlib import Path

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

    def propose(self, requests, max_tokens):
        out = []
        for r, k in zip(requests, max_tokens):
            ref = self.completions.get(tuple(r.prompt_token_ids), [])
            done = r.num_output_tokens
            out.append(Drafts([(t + 1) % TINY["vocab_size"] for t in ref[done : done + min(k, 4)]]))
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--speculator", choices=("miss", "ngram"), default="miss")
    args = p.parse_args()
    model = Path(tempfile.mkdtemp(prefix="pegboard-tiny-"))
    (model / "config.json").write_text(json.dumps(TINY))
    rng = random.Random(0)
    prompts = [[rng.randrange(TINY["vocab_size"]) for _ in range(128)] for _ in range(64)]
    params = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    base = {"load_format": "dummy", "device": "cpu"}
    with LLM(str(model), **base) as llm:
        llm.generate(prompts[:1], params)
        plain = llm.generate(prompts, params)
    settings = base | {"speculative_min_accept_rate": 0.0, "speculative_min_speedup": 0.0}
    plugins = None
    if args.speculator == "miss":
        MissOracle.completions = {tuple(q): o.token_ids for q, o in zip(prompts, plain)}
        plugins = PluginManager()
        plugins.add(MissOracle)
        settings["speculator"] = "oracle"
    else:
        settings |= {"speculator": "ngram", "plugin_options": {"ngram": {"num_draft_tokens": 4}}}
    with LLM(str(model), plugins=plugins, **settings) as llm:
        engine = llm.engine
        llm.generate(prompts[:1], params)  # the warm-up bench_speculative runs
        kinds, step = [], engine.step

        def step_kind():
            before = engine.speculation.num_verify
            out = step()
            verified = engine.speculation.num_verify - before
            pending = engine._pending is not None  # its tokens are read by the next step
            kinds.append(f"verify {verified}" if verified else "overlapped" if pending else "plain")
            return out

        engine.step = step_kind
        with HostProfile(engine, clock=time.thread_time) as profile:
            llm.generate(prompts, params)
        report = profile.report()
    counts = collections.Counter(k.split()[0] for k in kinds)
    result = {
        "steps": len(kinds),
        "verify_steps": counts["verify"],
        "unoverlapped_plain_steps": counts["plain"],  # the prefill step among them
        "overlapped_steps": counts["overlapped"],
        "request_verifies": sum(int(k.split()[1]) for k in kinds if k.startswith("verify")),
        "first_steps": kinds[:24],
        "host_ms_by_kind": report.get("host_ms_by_kind"),
        "forward_by_kind": report.get("forward_by_kind"),
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
