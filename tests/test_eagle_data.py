"""Self-distillation data and the trainer's masks for `pegboard spec train-eagle3` (CPU, a tiny
target): generation is batched, held-out prompts never reach training, the loss ignores prompt
and padding rows, the held-out accept length is what a greedy chain would get."""

from __future__ import annotations

import argparse

import torch
from pegboard.core.llm import LLM
from pegboard.core.speculative import eagle_data, train_eagle3
from pegboard.core.speculative.eagle_data import Features, generate_data, prompt_pool


def data_args(model_dir, **over) -> argparse.Namespace:
    args = {"model": str(model_dir), "prompts": None, "num_samples": 12, "heldout_prompts": 3,
            "max_new_tokens": 8, "temperature": "0.8,1.0", "gen_batch": 64, "gen_chunk": 4096,
            "data_minutes": 3.0, "dtype": "float32", "device": "cpu", "seed": 0}  # fmt: skip
    return argparse.Namespace(**{**args, **over})


def test_generation_is_one_batched_call_and_held_out_prompts_stay_out(
    tiny_llama_dir, tmp_path, monkeypatch
):
    calls = []
    real = LLM.generate

    def spy(self, prompts, params=None, **kw):
        calls.append(len(prompts))
        return real(self, prompts, params, **kw)

    monkeypatch.setattr(LLM, "generate", spy)
    train, held, stats = generate_data(data_args(tiny_llama_dir), tmp_path)
    assert calls == [15]  # 12 training + 3 held-out prompts in one engine call
    assert stats["generate_calls"] == 1 and stats["tokens"] > 0 and stats["tokens_per_s"] > 0
    assert len(train) == 12 and len(held) == 3
    held_prompts = {tuple(ids[:n]) for ids, n in held}
    train_prompts = {tuple(ids[:n]) for ids, n in train}
    assert len(held_prompts) == 3 and len(train_prompts) == 12
    assert not held_prompts & train_prompts
    # resuming: the files are read back, nothing is generated again
    again, held2, stats2 = generate_data(data_args(tiny_llama_dir), tmp_path)
    assert (again, held2) == (train, held) and stats2["generate_calls"] == 0 and calls == [15]
    # more samples later: only the new ones, from training prompts not used yet
    more, _, _ = generate_data(data_args(tiny_llama_dir, num_samples=16), tmp_path)
    assert calls == [15, 4] and more[:12] == train
    assert not {tuple(ids[:n]) for ids, n in more} & held_prompts


def test_data_budget_stops_generating_and_a_resume_keeps_the_data(tiny_llama_dir, tmp_path):
    """`--data-minutes 0`: one chunk (and the held-out prompts), then no more, now or when the
    run resumes (it trains on what is there instead of spending its call generating)."""
    args = data_args(tiny_llama_dir, num_samples=10, gen_chunk=4, data_minutes=0.0)
    train, held, stats = generate_data(args, tmp_path)
    assert (len(train), len(held), stats["generate_calls"]) == (4, 3, 1)
    again, held2, stats2 = generate_data(args, tmp_path)
    assert (again, held2, stats2["generate_calls"]) == (train, held, 0)


def test_prompt_pool_is_large_and_seeded():
    pool = prompt_pool(0)
    assert len(pool) > 20_000 and len(set(pool)) == len(pool)
    assert pool == prompt_pool(0) and pool != prompt_pool(1)


def test_loss_ignores_prompt_and_padding_rows(tiny_llama_dir):
    head, target = tiny_head(tiny_llama_dir)
    torch.manual_seed(0)
    B, T, V = 2, 10, target.lm_head.weight.shape[0]
    ids = torch.randint(0, V, (B, T))
    lengths, prompt_lens = torch.tensor([10, 7]), torch.tensor([4, 3])
    aux = torch.randn(B, T, head.fc.weight.shape[1])
    teacher = torch.randn(B, T, V).softmax(-1)
    loss, _ = train_eagle3.ttt_loss(head, aux, ids, teacher, 3, lengths, prompt_lens)
    # teacher row i predicts token i + 1: rows before prompt_len - 1 and from length - 1 on
    # are the prompt's and the padding's
    changed = teacher.clone()
    changed[0, :3] = torch.randn(3, V).softmax(-1)
    changed[1, :2] = torch.randn(2, V).softmax(-1)
    changed[1, 6:] = torch.randn(4, V).softmax(-1)
    same, _ = train_eagle3.ttt_loss(head, aux, ids, changed, 3, lengths, prompt_lens)
    assert torch.allclose(loss, same)
    changed[1, 5] = torch.randn(V).softmax(-1)  # the last generated row of sequence 1
    other, _ = train_eagle3.ttt_loss(head, aux, ids, changed, 3, lengths, prompt_lens)
    assert not torch.allclose(loss, other)


def test_heldout_accept_length_simulates_a_greedy_chain(monkeypatch):
    ids = torch.tensor([[5, 6, 1, 2, 3, 4, 7, 8]])  # prompt 2 tokens, 6 generated
    V = 10

    def one_hot(x):
        return torch.nn.functional.one_hot(x, V).float() * 10

    class Target:
        def compute_logits(self, final):  # the teacher: the text's next token
            nxt = torch.cat([ids[0, 1:], ids[0, :1]])
            return one_hot(nxt)

    feats = Features(ids, torch.tensor([8]), torch.tensor([2]), torch.tensor([0]),
                     torch.zeros(8, 3), torch.zeros(8, 4))  # fmt: skip

    def perfect(head, aux, x, steps):  # step s row t: token t + s + 2
        for s in range(steps):
            rows = x.shape[1] - s - 1
            yield one_hot(torch.cat([x[:, s + 2 :], x[:, :1]], 1)[:, :rows])

    monkeypatch.setattr(train_eagle3, "ttt_logits", perfect)
    m = train_eagle3.heldout_metrics(None, feats, Target(), k=2)
    # rows t = 0..5 predict generated tokens 2..7; t <= 4 accept 2 drafts, t = 5 one
    assert m["heldout_rows"] == 6 and m["heldout_top1"] == 1.0
    assert abs(m["heldout_accept_length"] - (5 * 3 + 2) / 6) < 1e-3

    def second_wrong(head, aux, x, steps):
        for s, logits in enumerate(perfect(head, aux, x, steps)):
            yield logits if s == 0 else logits.roll(1, -1)

    monkeypatch.setattr(train_eagle3, "ttt_logits", second_wrong)
    m = train_eagle3.heldout_metrics(None, feats, Target(), k=2)
    assert m["heldout_accept_length"] == 2.0


def test_padded_capture_equals_one_sequence_at_a_time(tiny_llama_dir):
    from pegboard.core.speculative.hidden import TargetHidden

    _, target = tiny_head(tiny_llama_dir)
    rows = [([1, 5, 9, 4, 7, 2], 2), ([3, 8, 6], 1), ([2, 2, 5, 1], 3)]
    hooks = TargetHidden(target, [0, 1, 2])
    batched = eagle_data.capture(target, hooks, rows, 16, "cpu", prefill_tokens=64)
    alone = [eagle_data.capture(target, hooks, [r], 16, "cpu") for r in rows]
    hooks.remove()
    assert batched.aux.shape[0] == 6 + 3 + 4  # packed: no padding stored
    index = torch.tensor([2, 0])  # a training batch's rows: sequence 2 padded to 6 tokens
    packed = batched.rows(index)
    for b, i in enumerate(index.tolist()):
        n = len(rows[i][0])
        assert torch.allclose(batched.aux[packed[b, :n]], alone[i].aux, rtol=1e-4, atol=1e-4)
        assert torch.allclose(batched.final[packed[b, :n]], alone[i].final, rtol=1e-4, atol=1e-4)
    ids, lengths, prompt_lens, aux, teacher = batched.batch(index, target)
    assert ids.tolist() == [[2, 2, 5, 1, 0, 0], [1, 5, 9, 4, 7, 2]] and aux.shape[:2] == (2, 6)
    assert lengths.tolist() == [4, 6] and prompt_lens.tolist() == [3, 2]
    assert torch.allclose(teacher[1], target.compute_logits(alone[0].final).softmax(-1), atol=1e-5)


def tiny_head(model_dir):
    import json
    from pathlib import Path

    from pegboard.core.models import load_model
    from pegboard.plugins.speculative.eagle import EagleHead

    loaded = load_model(str(model_dir), "float32", "cpu", None, progress=False)
    target = loaded.model.eval()
    cfg = train_eagle3.head_config(json.loads((Path(model_dir) / "config.json").read_text()),
                                   train_eagle3.default_aux(loaded.info.num_layers))  # fmt: skip
    head = EagleHead(cfg, True, target)
    for norm in (head.input_layernorm, head.hidden_norm, head.post_attention_layernorm, head.norm):
        torch.nn.init.ones_(norm.weight)
    return head, target
