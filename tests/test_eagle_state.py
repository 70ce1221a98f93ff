"""Training an EAGLE-3 head across lent-machine calls (CPU, a tiny target): the state that
leaves a call is the trainable parameters alone in bounded shards, a fresh machine resumes from
those files only (new AdamW, LR warmed up again, a new data round from unused prompts), and a
torn or foreign state is refused with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from pegboard.core.cli.main import main
from pegboard.core.speculative import eagle_state
from pegboard.core.speculative.train_eagle3 import build_head, learning_rate
from safetensors.torch import load_file
from test_eagle_data import tiny_head
from test_train_eagle3 import train_args


def test_a_fresh_machine_resumes_from_the_carried_state_alone(tiny_llama_dir, tmp_path, capsys):
    first = tmp_path / "call1"
    common = ["--save-every", "4", "--warmup-steps", "3", "--state-shard-mb", "0.05"]
    assert main([*train_args(tiny_llama_dir, first), *common, "--steps", "4"]) == 0
    state = json.loads((first / "state.json").read_text())
    assert state["step"] == 4 and state["data_offset"] == 0 and state["prompts_used"] == 6
    assert len(state["shards"]) > 1  # 0.05 MiB shards: the tiny head's state needs several
    for name in state["shards"]:
        assert (first / name).stat().st_size <= 0.05 * 2**20 + 4096  # + the header
    tensors = {}
    for name in state["shards"]:
        tensors.update(load_file(str(first / name)))
    assert "lm_head.weight" not in tensors and "fc.weight" in tensors  # the LM head: target's
    assert all(t.dtype == torch.float32 for t in tensors.values())

    # what comes back through $OUT and is carried: state.json and the shards, nothing else
    second = tmp_path / "call2"
    second.mkdir()
    for name in ["state.json", *state["shards"]]:
        shutil.copy(first / name, second / name)
    capsys.readouterr()
    assert main([*train_args(tiny_llama_dir, second), *common, "--steps", "8"]) == 0
    printed = capsys.readouterr().out
    assert "resumed at step 4 (optimizer state new: LR warms up again)" in printed
    log = [json.loads(line) for line in (second / "train_log.jsonl").open()]
    steps = [r for r in log if "loss" in r]
    assert [r["step"] for r in steps] == [5, 6, 7, 8]

    class Plan:  # the CLI's schedule: --lr 3e-3 --steps 8 --warmup-steps 3
        lr, steps, train_minutes, warmup_steps, min_lr_ratio = 3e-3, 8, 0.0, 3, 0.1

    # warming up again from step 4: a third of the plan's rate, then two thirds, then all of it
    for r, part in zip(steps, (1 / 3, 2 / 3, 1.0)):
        assert r["lr"] == pytest.approx(part * learning_rate(Plan, r["step"] - 1, 0.0)[0])
    assert [r["step"] for r in log if "heldout_top1" in r] == [8]
    state2 = json.loads((second / "state.json").read_text())
    assert (state2["data_offset"], state2["prompts_used"], state2["round_step"]) == (6, 12, 4)

    # the new round trained on other prompts than the first; the held-out ones stay out
    def prompts(path):
        return {tuple(r["ids"][: r["prompt_len"]]) for r in map(json.loads, path.open())}

    round1, round2 = prompts(first / "data.jsonl"), prompts(second / "data.jsonl")
    held = prompts(second / "heldout.jsonl")
    assert len(round2) == 6 and not round1 & round2 and not held & (round1 | round2)
    assert (second / "model.safetensors").exists() and (second / "config.json").exists()


def test_the_same_round_continues_its_batch_order(tiny_llama_dir, tmp_path):
    """A call cut by its budget and run again with its data there (a warm machine) continues
    the round: same data, the optimizer state resumed, no step of the plan repeated."""
    out = tmp_path / "head"
    args = [*train_args(tiny_llama_dir, out), "--save-every", "2", "--warmup-steps", "1"]
    assert main([*args, "--steps", "2"]) == 0
    data = (out / "data.jsonl").read_text()
    assert main([*args, "--steps", "4"]) == 0
    assert (out / "data.jsonl").read_text() == data
    state = json.loads((out / "state.json").read_text())
    assert (state["step"], state["round_step"], state["data_offset"]) == (4, 0, 0)


def test_torn_or_foreign_state_is_refused(tiny_llama_dir, tmp_path):
    head, target = tiny_head(tiny_llama_dir)
    head.lm_head.weight.requires_grad_(False)
    names = eagle_state.save_state(head, None, tmp_path, {"step": 3}, shard_mb=0.05)
    assert len(names) > 1 and not (tmp_path / eagle_state.OPTIMIZER).exists()
    other, _ = tiny_head(tiny_llama_dir)
    other.lm_head.weight.requires_grad_(False)
    meta = eagle_state.load_state(other, None, tmp_path)
    assert meta["step"] == 3 and not meta["optimizer_resumed"]
    assert torch.equal(other.fc.weight, head.fc.weight)

    head.fc.weight.data += 1  # a second save killed after its first shard: steps differ
    (tmp_path / "later").mkdir()
    eagle_state.save_state(head, None, tmp_path / "later", {"step": 4}, shard_mb=0.05)
    shutil.copy(tmp_path / "later" / names[0], tmp_path / names[0])
    with pytest.raises(ValueError, match="is of step 4, state.json of step 3"):
        eagle_state.load_state(other, None, tmp_path)

    with pytest.raises(FileNotFoundError, match="no state.json"):
        eagle_state.load_state(other, None, tmp_path / "empty")
    trains_lm_head, _ = tiny_head(tiny_llama_dir)  # its state would need the LM head too
    with pytest.raises(ValueError, match="lacks"):
        eagle_state.load_state(trains_lm_head, None, tmp_path / "later")


def test_learning_rate_warms_up_again_from_a_resume():
    class Args:
        lr, steps, train_minutes, warmup_steps, min_lr_ratio = 1.0, 100, 0.0, 10, 0.1

    assert learning_rate(Args, 0, 0.0)[0] == pytest.approx(0.1)
    assert learning_rate(Args, 50, 0.0)[0] > 0.5
    resumed = learning_rate(Args, 50, 0.0, warm_from=50)[0]
    assert resumed == pytest.approx(learning_rate(Args, 50, 0.0)[0] / 10)
    assert learning_rate(Args, 59, 0.0, warm_from=50)[0] == learning_rate(Args, 59, 0.0)[0]


def test_the_trained_head_keeps_the_targets_lm_head(tiny_llama_dir):
    _, target = tiny_head(tiny_llama_dir)
    head = build_head(json.loads(json.dumps(_cfg(tiny_llama_dir))), target, "cpu")
    assert torch.equal(head.lm_head.weight, target.lm_head.weight.float())
    assert not head.lm_head.weight.requires_grad and "lm_head.weight" not in eagle_state.trainable(
        head)  # fmt: skip
    trained = build_head(_cfg(tiny_llama_dir), target, "cpu", train_lm_head=True)
    assert "lm_head.weight" in eagle_state.trainable(trained)
    target.lm_head = torch.nn.Linear(4, 4)  # nothing to copy: a frozen LM head would be random
    with pytest.raises(ValueError, match="could not be the target's"):
        build_head(_cfg(tiny_llama_dir), target, "cpu")


def _cfg(model_dir):
    from pathlib import Path

    from pegboard.core.speculative.train_eagle3 import default_aux, head_config

    cfg = json.loads((Path(model_dir) / "config.json").read_text())
    return head_config(cfg, default_aux(cfg["num_hidden_layers"]))
