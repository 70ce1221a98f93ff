"""`pegboard spec train-eagle3` on a tiny target (CPU): self-distillation data, training-time
test, checkpoints that resume, and a head in SGLang's EAGLE-3 format that serves losslessly."""

from __future__ import annotations

import json

import torch
from pegboard.core.cli.main import main
from pegboard.core.speculative.train_eagle3 import _ttt_attention
from pegboard.plugins.speculative.eagle import EagleHead


def test_train_resume_and_serve(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "head"
    common = ["spec", "train-eagle3", "--model", str(tiny_llama_dir), "--out", str(out),
              "--num-samples", "6", "--max-new-tokens", "24", "--batch-size", "3",
              "--ttt-steps", "3", "--save-every", "6", "--lr", "3e-3", "--dtype", "float32",
              "--device", "cpu"]  # fmt: skip
    assert main([*common, "--steps", "12"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert len(log) == 12 and log[-1]["loss"] < log[0]["loss"]
    assert len((out / "data.jsonl").read_text().splitlines()) == 6
    assert main([*common, "--steps", "14"]) == 0
    assert "resumed at step 12" in capsys.readouterr().out
    assert len((out / "train_log.jsonl").read_text().splitlines()) == 14
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLMEagle3"]

    from pegboard.sdk.types import SamplingParams
    from test_speculative import generate, repetitive_prompts

    prompts = repetitive_prompts(512, n=3)
    params = SamplingParams(max_tokens=12, temperature=0.0)
    plain, _ = generate(tiny_llama_dir, prompts, params=params)
    spec, stats = generate(
        tiny_llama_dir, prompts, params=params, speculator="eagle",
        plugin_options={"eagle": {"model_path": str(out)}},
    )  # fmt: skip
    assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert stats["spec_draft_tokens"] > 0


def test_ttt_attention_sees_real_keys_up_to_its_row_and_its_own_drafts():
    """Step 1's row t: step 0's keys 0..t and step 1's key at row t, nothing else."""

    class Head:
        num_heads = num_kv_heads = 1
        head_dim = 1

    rows = 3
    q = torch.ones(rows, 1, 1)
    k0 = torch.zeros(rows, 1, 1)
    k1 = torch.zeros(rows, 1, 1)
    v0 = torch.tensor([1.0, 10.0, 100.0]).view(rows, 1, 1)
    v1 = torch.tensor([1000.0, 2000.0, 3000.0]).view(rows, 1, 1)
    out = _ttt_attention(Head(), q, [k0, k1], [v0, v1], rows)  # equal scores: plain means
    assert torch.allclose(out.view(-1), torch.tensor([(1 + 1000) / 2, (1 + 10 + 2000) / 3,
                                                      (1 + 10 + 100 + 3000) / 4]))  # fmt: skip
    assert EagleHead  # the trainer builds the serving head class
