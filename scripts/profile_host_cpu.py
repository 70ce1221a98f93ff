"""The engine's host work per step on a CPU, phase by phase, with the model taken out.

python3 scripts/profile_host_cpu.py [--config qwen3-0.6b|DIR] [--rounds 4] [--temperature 0]

Builds an engine over a random-weight config (`--config`: a bundled name or a directory with a
`config.json`; the default is a 1-layer, 32-wide Qwen3 with a 2,048-token vocabulary), replaces
the model forward by zero logits, and runs 256 requests (16-64 prompt tokens, 100-400 output
tokens, EOS ignored) `--rounds` times under `HostProfile` with the thread's CPU clock, so the
figures are the loop's own Python work (schedule, checks, prepare, sampling calls, resolve,
detokenize, ...) and other processes' load on a shared machine does not land on them. Prints
each phase's smallest CPU ms per step over the rounds. Compare trees with the same command;
on a GPU use `pegboard bench offline --profile-host` (wall clock, real forward).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from pegboard.core.bench.host_profile import HostProfile
from pegboard.core.bench.models import random_weights_model_dir
from pegboard.core.bench.offline import OfflineWorkload
from pegboard.core.llm import LLM

TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 2048, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "rope_theta": 1000000, "tie_word_embeddings": True,
    "torch_dtype": "float32", "eos_token_id": 2, "bos_token_id": 1,
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="bundled config name or directory")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    args = p.parse_args()
    if args.config:
        model = random_weights_model_dir(args.config)
    else:
        model = Path(tempfile.mkdtemp(prefix="pegboard-tiny-"))
        (model / "config.json").write_text(json.dumps(TINY))
    llm = LLM(str(model), load_format="dummy", device="cpu")
    vocab = llm.engine.info.vocab_size

    def forward(batch):  # the model's work is not host work: zero logits, right shape
        rows = batch.logits_rows.shape[0] if batch.logits_rows is not None else sum(batch.samples)
        return torch.zeros(rows, vocab)

    llm.engine.runner.forward = forward
    workload = OfflineWorkload(
        num_seqs=256, min_input=16, max_input=64, min_output=100, max_output=400,
        max_token_id=min(2000, vocab - 1), temperature=args.temperature,
    )  # fmt: skip
    prompts, params = workload.build()
    llm.generate([prompts[0][:16]], params[0])  # warm-up
    reports = []
    for _ in range(args.rounds):
        with HostProfile(llm.engine, clock=time.thread_time) as profile:
            llm.generate(prompts, params)
        reports.append(profile.report())
    phases = reports[0]["ms_per_step"]
    best = {k: round(min(r["ms_per_step"].get(k, 0.0) for r in reports), 3) for k in phases}
    print(json.dumps({"steps": reports[0]["steps"], "cpu_ms_per_step": best}, indent=1))
    llm.close()


if __name__ == "__main__":
    main()
