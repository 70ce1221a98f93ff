"""`pegboard spec train-eagle3` on a tiny target (CPU): self-distillation data, training-time
test, checkpoints that resume, and a head in SGLang's EAGLE-3 format that serves losslessly."""

from __future__ import annotations

import json

import pytest
import test_speculative
import torch
from pegboard.core.cli.main import main
from pegboard.core.speculative.eagle_state import load_state
from pegboard.core.speculative.train_eagle3 import (
    _ttt_attention,
    build_head,
    default_aux,
    trainer_drafts,
)
from pegboard.plugins.speculative.eagle import EagleHead, aux_layers

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs


def test_train_resume_and_serve(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "head"
    common = [*train_args(tiny_llama_dir, out), "--save-every", "6", "--warmup-steps", "1"]
    assert main([*common, "--steps", "12"]) == 0
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    steps = [r for r in log if "loss" in r]
    assert len(steps) == 12 and steps[-1]["loss"] < steps[0]["loss"]
    held = [r for r in log if "heldout_top1" in r]  # at every checkpoint (6, 12)
    assert [r["step"] for r in held] == [6, 12] and held[0]["heldout_rows"] > 0
    assert 1.0 <= held[-1]["heldout_accept_length"] <= 5.0
    assert len((out / "data.jsonl").read_text().splitlines()) == 6
    assert json.loads((out / "state.json").read_text())["step"] == 12
    assert main([*common, "--steps", "14"]) == 0
    assert "resumed at step 12 (optimizer state resumed)" in capsys.readouterr().out
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 15))  # continued at 13
    assert json.loads((out / "state.json").read_text())["step"] == 14
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

    # The trainer's own head (its state, built as the trainer builds it) and features (its
    # layers) predict every draft serving proposed.
    def trainer_head(target):
        head = build_head(config, target, "cpu")
        load_state(head, None, out)
        return head, default_aux(len(target.model.layers))

    served, trained = served_and_trainer_drafts(tiny_llama_dir, out, prompts, trainer_head)
    assert served == trained and len(served) >= 6


def train_args(model_dir, out, samples: int = 6) -> list[str]:
    return ["spec", "train-eagle3", "--model", str(model_dir), "--out", str(out),
            "--num-samples", str(samples), "--heldout-prompts", "2", "--max-new-tokens", "24",
            "--batch-size", "3", "--ttt-steps", "3", "--lr", "3e-3", "--dtype", "float32",
            "--device", "cpu"]  # fmt: skip


def test_time_budget_stops_with_a_checkpoint(tiny_llama_dir, tmp_path, capsys):
    """`--max-minutes 0`: the first step is past the budget; the run saves and stops there."""
    out = tmp_path / "head"
    args = [*train_args(tiny_llama_dir, out, samples=3), "--steps", "1000", "--save-every", "500"]
    assert main([*args, "--max-minutes", "0"]) == 0
    assert "stopped at step 1 (--max-minutes)" in capsys.readouterr().out
    assert json.loads((out / "state.json").read_text())["step"] == 1
    assert (out / "model.safetensors").exists()
    log = [json.loads(line) for line in (out / "train_log.jsonl").open()]
    assert [r["step"] for r in log] == [1, 1] and "heldout_accept_length" in log[1]


def served_and_trainer_drafts(model_dir, head_dir, prompts, trainer_head, spy=None, **settings):
    """Every chain of drafts `eagle` proposed (float32, CPU unless `settings` say otherwise)
    while generating `prompts`, and what the trainer's forward (`trainer_drafts`) drafts for
    the same contexts and inputs: `trainer_head(target)` gives the trainer's head and its
    target layers. `spy(speculator)` is called after generating."""
    from pegboard.core.llm import LLM
    from pegboard.core.speculative.hidden import TargetHidden
    from pegboard.sdk.types import SamplingParams
    from test_speculative_eagle import record_drafts

    options = {"model_path": str(head_dir), "num_draft_tokens": 4}
    settings = {"dtype": "float32", "device": "cpu", **settings}
    with LLM(str(model_dir), speculator="eagle", plugin_options={"eagle": options},
             speculative_min_accept_rate=0.0, **settings) as llm:  # fmt: skip
        seen, _ = record_drafts(llm)
        llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
        if spy is not None:
            spy(llm.engine.plugins.active("speculator"))
        records = [(list(context), drafts) for context, drafts in seen.items()]
        target = llm.engine.runner.model
        head, layers = trainer_head(target)
        head = head.to(target.lm_head.weight.device)
        hooks = TargetHidden(target, layers)
        try:
            trained = [trainer_drafts(head, target, hooks, c, d) for c, d in records]
        finally:
            hooks.remove()
    return [d for _, d in records], trained


def test_served_drafts_are_the_trainers_for_an_sglang_head(case, tmp_path):
    """An SGLang-format EAGLE-3 head (attention-heavy random weights, a reduced vocabulary
    mapped with `d2t`, its own target layers): serving drafts what the trainer's forward
    drafts, at every step of every chain."""
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, _ = case
    path = build_eagle3_head(tmp_path / "h", aux=(0, 1, -1), attention_heavy=True)
    config = json.loads((path / "config.json").read_text())

    def trainer_head(target):
        head = EagleHead(config, True, target, str(path))
        return head, aux_layers(config, len(target.model.layers))

    served, trained = served_and_trainer_drafts(model_dir, path, prompts[:3], trainer_head)
    assert served == trained and len(served) >= 6
    assert any(len(set(d)) > 1 for d in served)  # drafts that depend on the step


def test_ttt_attention_sees_real_keys_up_to_its_row_and_its_own_drafts():
    """Step 1's row t: step 0's keys 0..t and step 1's key at row t, nothing else."""

    class Head:
        num_heads = num_kv_heads = 1
        head_dim = 1

    rows = 3
    q = torch.ones(2, rows, 1, 1)  # a batch of two sequences, the second's values x2
    k0 = torch.zeros(2, rows, 1, 1)
    k1 = torch.zeros(2, rows, 1, 1)
    twice = torch.tensor([1.0, 2.0]).view(2, 1, 1, 1)
    v0 = torch.tensor([1.0, 10.0, 100.0]).view(1, rows, 1, 1) * twice
    v1 = torch.tensor([1000.0, 2000.0, 3000.0]).view(1, rows, 1, 1) * twice
    out = _ttt_attention(Head(), q, [k0, k1], [v0, v1], rows)  # equal scores: plain means
    means = torch.tensor([(1 + 1000) / 2, (1 + 10 + 2000) / 3, (1 + 10 + 100 + 3000) / 4])
    assert torch.allclose(out.view(2, rows), torch.stack([means, 2 * means]))
    assert EagleHead  # the trainer builds the serving head class


@pytest.mark.gpu
def test_gpu_served_drafts_are_the_trainers(case, tmp_path):
    """On CUDA (float32): the head's Triton attention and its drafting CUDA graphs draft what
    the trainer's forward drafts (up to float near-ties of a random head)."""
    from fixtures.devices import GPU_ENGINE
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, _ = case
    path = build_eagle3_head(tmp_path / "h", aux=(0, 1, -1), attention_heavy=True)
    config = json.loads((path / "config.json").read_text())
    replays = []

    def trainer_head(target):
        layers = aux_layers(config, len(target.model.layers))
        return EagleHead(config, True, target, str(path)), layers

    def spy(speculator):
        replays.append(getattr(speculator.graphs, "num_replays", 0))

    served, trained = served_and_trainer_drafts(
        model_dir, path, prompts, trainer_head, spy, **GPU_ENGINE, attention="triton",
        cuda_graph_max_bs=8,
    )  # fmt: skip
    assert replays[0] > 0  # the drafting graphs ran
    first = sum(a[0] == b[0] for a, b in zip(served, trained)) / len(served)
    chains = sum(a == b for a, b in zip(served, trained)) / len(served)
    assert len(served) >= 10 and first >= 0.95 and chains >= 0.9, (first, chains)
