"""`pegboard spec train-eagle3`: train an EAGLE-3 head for a target by self-distillation.

1. Data (`eagle_data.py`): the target answers a large, varied prompt pool through pegboard's
   own engine, many prompts per `generate` call (`OUT/data.jsonl`); held-out prompts, never
   trained on, are answered greedily (`OUT/heldout.jsonl`).
2. Features: every sequence prefilled once through the target in padded batches, the three
   auxiliary hidden states captured by the hooks serving uses (`core/speculative/hidden.py`)
   and the final hidden state kept (the target's logits, the teacher, come from it per batch).
3. Training-time test (EAGLE-3 / SpecForge), on padded batches: the head is unrolled
   `--ttt-steps` times; step `s` feeds on step `s - 1`'s outputs, and its queries see the real
   keys up to their own position plus their own row's keys of steps 1..s, exactly what
   drafting sees at inference. Loss: cross-entropy against the target's distribution,
   weighted 0.8^s, over rows that predict generated tokens only (not the prompt, not padding).
   Warm-up then cosine decay over `--steps` or `--train-minutes` (the whole plan across calls).

The head's output side is the target's: the embedding and the LM head are frozen
(`--train-lm-head` trains the LM head too), so the state is small (`eagle_state.py`: fc, one
decoder layer, norms; 20 MB for SmolLM2) and can leave a lent GPU machine through its `$OUT`.
It is written every `--save-every` steps, at the end, and when `--max-minutes` is reached (a
call's time budget, data generation included). A run resumes from it: with `data.jsonl` there,
the same round (same data, the batch order continued); without it, a new round: new data from
the prompts after the last round's, so every call of a plan trains on text it has not seen.
Each save logs `heldout_top1` and `heldout_accept_length` (`heldout_metrics`). `OUT` always
holds the latest head in SGLang's EAGLE-3 format (`config.json`, `model.safetensors`),
loadable with `--speculative-algorithm EAGLE3 --speculative-draft-model-path OUT`.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
from torch.nn import functional as F


class DenseCausal:
    """Attention without a KV cache for one whole sequence (feature extraction)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            is_causal=True, enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        return out.transpose(0, 1)


def head_config(target_cfg: dict, aux: list[int]) -> dict:
    h = target_cfg["hidden_size"]
    return {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": h,
        "target_hidden_size": h,
        "intermediate_size": target_cfg["intermediate_size"],
        "num_attention_heads": target_cfg["num_attention_heads"],
        "num_key_value_heads": target_cfg.get(
            "num_key_value_heads", target_cfg["num_attention_heads"]
        ),
        "head_dim": target_cfg.get("head_dim") or h // target_cfg["num_attention_heads"],
        "num_hidden_layers": 1,
        "vocab_size": target_cfg["vocab_size"],
        "draft_vocab_size": target_cfg["vocab_size"],
        "rms_norm_eps": target_cfg.get("rms_norm_eps", 1e-6),
        "rope_theta": target_cfg.get("rope_theta")
        or (target_cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0),
        "rope_scaling": target_cfg.get("rope_scaling"),
        "max_position_embeddings": target_cfg.get("max_position_embeddings", 4096),
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": [i - 1 for i in aux]},
    }


def default_aux(num_layers: int) -> list[int]:
    """SGLang's layers (2, L/2, L-3), clamped into the target (tiny test models)."""
    return [min(max(i, 0), num_layers) for i in (2, num_layers // 2, num_layers - 3)]


def ttt_loss(head, aux, ids, teacher, steps: int, lengths, prompt_lens):
    """The unrolled loss of a padded batch (see the module docstring) and step 0's top-1 match
    with the target's argmax. Both count only rows that predict a generated token (index >=
    the prompt length, < the sequence's length): serving drafts only those (the prompts'
    templates are easy to memorise), and padding predicts nothing."""
    total, match = 0.0, 0.0
    for s, logits in enumerate(ttt_logits(head, aux, ids, steps)):
        rows = logits.shape[1]
        target = teacher[:, s + 1 : s + 1 + rows]
        mask = loss_mask(rows, s, lengths, prompt_lens)
        per_row = -(target * logits.log_softmax(-1)).sum(-1)
        total = total + (0.8**s) * (per_row * mask).sum() / mask.sum().clamp(min=1)
        if s == 0:
            hits = (logits.argmax(-1) == target.argmax(-1)) & mask
            match = float(hits.sum() / mask.sum().clamp(min=1))
    return total, match


def loss_mask(rows: int, s: int, lengths, prompt_lens):
    """`[B, rows]`: step `s`'s row `t` predicts token `t + s + 2`; True where that token is
    generated (not the prompt's, not padding)."""
    j = torch.arange(rows, device=lengths.device) + s + 2
    return (j[None] < lengths[:, None]) & (j[None] >= prompt_lens[:, None])


def ttt_logits(head, aux: torch.Tensor, ids: torch.Tensor, steps: int):
    """Per unrolled step `s`, the head's float32 draft-vocabulary logits `[B, rows, draft
    vocab]` for right-padded sequences `ids [B, T]` and their features `aux [B, T, F]`: row
    `t` fed on the feature at `t` and tokens `t + 1 .. t + s + 1`, predicting token `t + s +
    2` (what serving drafts at step `s` after a context ending at token `t + 1`)."""
    B, T = ids.shape
    emb_all = head.embed(ids).to(aux.dtype)
    hidden = head.fc(aux[:, : T - 1])  # rows t = 0 .. T-2: feature at t, token t + 1
    keys, values = [], []
    for s in range(steps):
        rows = T - s - 1  # token t + s + 1 must exist
        if rows < 2:
            break
        h = hidden[:, :rows]
        emb = emb_all[:, s + 1 : s + 1 + rows]
        x = torch.cat([head.input_layernorm(emb), head.hidden_norm(h)], dim=-1)
        pos = torch.arange(s, s + rows, device=ids.device).repeat(B)
        q = head.q_proj(x).view(B * rows, head.num_heads, head.head_dim)
        k = head.k_proj(x).view(B * rows, head.num_kv_heads, head.head_dim)
        v = head.v_proj(x).view(B, rows, head.num_kv_heads, head.head_dim)
        q, k = head.rotary(pos, q, k)
        keys.append(k.view(B, rows, head.num_kv_heads, head.head_dim))
        values.append(v)
        attn = _ttt_attention(head, q.view(B, rows, head.num_heads, head.head_dim), keys,
                              values, rows)  # fmt: skip
        h2 = head.o_proj(attn) + h
        mlp_in = head.post_attention_layernorm(h2)
        out = head.down_proj(F.silu(head.gate_proj(mlp_in)) * head.up_proj(mlp_in)) + h2
        yield head.lm_head(head.norm(out)).float()
        hidden = out


@torch.no_grad()
def trainer_drafts(head, target, hooks, context: list[int], drafts: list[int]) -> list[int]:
    """What the trainer's own forward (`ttt_logits`) drafts after `context`, step `s` fed on
    `drafts[:s]` (the served drafts, so that each step is compared on the same inputs):
    target ids, one per draft. Serving must propose exactly these (`tests/test_train_eagle3`,
    `scripts/eagle_consistency.py`). `hooks`: a `TargetHidden` on `target` for the head's
    layers."""
    device = head.fc.weight.device
    ids = torch.tensor(context + drafts[:-1], device=device)
    target(ids, torch.arange(ids.shape[0], device=device), DenseCausal())
    features = hooks.features().to(head.fc.weight.dtype)
    row = len(context) - 2  # the feature at the last context token but one, then its token
    out = []
    for logits in ttt_logits(head, features[None], ids[None], len(drafts)):
        draft = int(logits[0, row].argmax())
        out.append(draft + int(head.d2t[draft]))
    return out


def _ttt_attention(head, q, keys, values, rows):
    """Row t of step s sees step 0's keys 0..t and its own row's keys of steps 1..s (`q`
    `[B, rows, H, D]`, keys and values `[B, rows of their step, Hkv, D]`)."""
    group = head.num_heads // head.num_kv_heads
    k0 = keys[0][:, :rows].repeat_interleave(group, dim=2)  # [B, rows, H, D]
    v0 = values[0][:, :rows].repeat_interleave(group, dim=2)
    scale = 1 / math.sqrt(head.head_dim)
    scores0 = torch.einsum("bthd,bshd->bhts", q, k0) * scale
    causal = torch.ones(rows, rows, dtype=torch.bool, device=q.device).tril()
    scores0 = scores0.masked_fill(~causal, float("-inf"))
    diag = [
        (q * k[:, :rows].repeat_interleave(group, dim=2)).sum(-1).transpose(1, 2).unsqueeze(-1)
        * scale
        for k in keys[1:]
    ]  # each [B, H, rows, 1]
    probs = torch.cat([scores0, *diag], dim=-1).softmax(-1)
    out = torch.einsum("bhts,bshd->bthd", probs[..., :rows], v0)
    for j, v in enumerate(values[1:]):
        weight = probs[..., rows + j].transpose(1, 2).unsqueeze(-1)  # [B, rows, H, 1]
        out = out + weight * v[:, :rows].repeat_interleave(group, dim=2)
    return out.reshape(*q.shape[:2], -1)


@torch.no_grad()
def heldout_metrics(head, feats, target, k: int, batch: int = 16) -> dict:
    """On the held-out (greedy) sequences: `heldout_top1`, step 0's agreement with the target's
    argmax on generated rows, and `heldout_accept_length`, a chain of `k` drafts simulated at
    every generated position: 1 + how many drafts in a row equal the text's next tokens (the
    text is the target's greedy output, so that is what greedy verify would accept)."""
    hits = rows_seen = accepted = 0
    for start in range(0, feats.ids.shape[0], batch):
        index = torch.arange(start, min(start + batch, feats.ids.shape[0]), device=feats.ids.device)
        ids, lengths, prompt_lens, aux, teacher = feats.batch(index, target)
        preds = [logits.argmax(-1) for logits in ttt_logits(head, aux, ids, k)]
        T = ids.shape[1]
        valid = loss_mask(T - 1, 0, lengths, prompt_lens)
        hits += int(((preds[0] == teacher[:, 1:].argmax(-1)) & valid).sum())
        rows_seen += int(valid.sum())
        alive, count = valid.clone(), torch.zeros_like(valid, dtype=torch.long)
        for s, p in enumerate(preds):
            m = T - s - 2  # rows whose token t + s + 2 exists
            ok = torch.zeros_like(valid)
            ok[:, :m] = (p[:, :m] == ids[:, s + 2 :]) & loss_mask(m, s, lengths, prompt_lens)
            alive &= ok
            count += alive
        accepted += int((count + 1)[valid].sum())
    n = max(rows_seen, 1)
    return {"heldout_top1": round(hits / n, 4), "heldout_accept_length": round(accepted / n, 3),
            "heldout_rows": rows_seen}  # fmt: skip


def build_head(cfg: dict, target, device, train_lm_head: bool = False):
    """A fresh float32 head for training: norms at one, the output side (final norm, LM head)
    the target's (`init_from_target`); the embedding is the target's and frozen, the LM head
    frozen too unless `train_lm_head` (then it is part of the state: 113 MB for SmolLM2)."""
    from pegboard.plugins.speculative.eagle import EagleHead

    head = EagleHead(cfg, True, target).to(device=device, dtype=torch.float32)
    for norm in (head.input_layernorm, head.hidden_norm, head.post_attention_layernorm, head.norm):
        torch.nn.init.ones_(norm.weight)  # the model's norms are allocated, not initialised
    head.embed.weight.requires_grad_(False)
    init_from_target(head, target)
    theirs = getattr(target.lm_head, "weight", None)
    if not train_lm_head and not (isinstance(theirs, torch.Tensor)
                                  and torch.equal(head.lm_head.weight, theirs.float())):  # fmt: skip
        raise ValueError("the head's LM head could not be the target's (another shape or no "
                         "weight): train it with --train-lm-head")  # fmt: skip
    head.lm_head.weight.requires_grad_(train_lm_head)
    return head


def train(args) -> int:
    from pegboard.core.models import load_model
    from pegboard.core.speculative.eagle_data import capture, generate_data
    from pegboard.core.speculative.eagle_state import load_state, read_state, save_state
    from pegboard.core.speculative.hidden import TargetHidden

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    saved = read_state(out)
    # this round's data: the one on disk (a resumed round), else new prompts after the last
    # round's (a later call on a fresh machine, or after the job removed the old data)
    same_round = (out / "data.jsonl").exists()
    offset = saved.get("data_offset" if same_round else "prompts_used", 0)
    # the step this round's data began at: its batch order starts there
    first = saved.get("round_step", 0) if same_round else saved.get("step", 0)
    data, held, _ = generate_data(args, out, offset)
    if not data:
        raise ValueError(f"no training sequences in {out / 'data.jsonl'} (--num-samples, "
                         "--data-minutes)")  # fmt: skip
    data_meta = {"data_offset": offset, "prompts_used": offset + len(data), "round_step": first}
    if torch.cuda.is_available():  # the generating engine's KV cache, before the features
        torch.cuda.empty_cache()
    loaded = load_model(args.model, args.dtype, args.device, None, progress=False)
    target = loaded.model.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    target_cfg = json.loads((Path(args.model) / "config.json").read_text())
    aux = default_aux(loaded.info.num_layers)
    cfg = head_config(target_cfg, aux)
    device = loaded.info.device
    head = build_head(cfg, target, device, args.train_lm_head)
    params = [p for p in head.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    step, trained_s, warm_from = 0, 0.0, 0
    if saved:
        state = load_state(head, opt, out)
        step, trained_s = state["step"], state.get("trained_s", 0.0)
        warm_from = state.get("warm_from", 0) if state["optimizer_resumed"] else step
        print(f"resumed at step {step} (optimizer state "
              f"{'resumed' if state['optimizer_resumed'] else 'new: LR warms up again'})",
              flush=True)  # fmt: skip
    hooks = TargetHidden(target, aux)
    t0 = time.monotonic()
    feats = capture(target, hooks, data, args.max_len, device, args.prefill_tokens)
    held_feats = capture(target, hooks, held, args.max_len, device) if held else None
    hooks.remove()
    tokens = int(feats.lengths.sum())
    print(json.dumps({"captured_sequences": len(data), "captured_tokens": tokens,
                      "capture_s": round(time.monotonic() - t0, 2)}), flush=True)  # fmt: skip
    log = (out / "train_log.jsonl").open("a")
    amp = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
           else contextlib.nullcontext())  # fmt: skip
    order = Order(len(data), args.seed + offset)
    while True:
        lr, progress = learning_rate(args, step, trained_s, warm_from)
        if progress >= 1:
            break
        for group in opt.param_groups:
            group["lr"] = lr
        t = time.monotonic()
        index = torch.tensor(order.batch(step - first, args.batch_size), device=device)
        ids, lengths, prompt_lens, features, teacher = feats.batch(index, target)
        with amp:
            loss, match = ttt_loss(head, features, ids, teacher, args.ttt_steps, lengths,
                                   prompt_lens)  # fmt: skip
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        record = {"step": step, "loss": round(float(loss.detach()), 4), "top1_match": round(match, 4),
                  "lr": lr, "epoch": round((step - first) * args.batch_size / len(data), 3)}  # fmt: skip
        trained_s += time.monotonic() - t
        log.write(json.dumps(record) + "\n")
        if step % 10 == 0:
            print(json.dumps(record), flush=True)
        out_of_time = time.monotonic() - started > 60 * args.max_minutes
        done = learning_rate(args, step, trained_s, warm_from)[1] >= 1
        if step % args.save_every == 0 or done or out_of_time:
            meta = {"step": step, "trained_s": round(trained_s, 3), "warm_from": warm_from,
                    **data_meta}  # fmt: skip
            save_state(head, opt, out, meta, args.state_shard_mb)
            export(head, cfg, out)
            if held_feats is not None:  # prompts the head never trained on
                with amp:
                    record = {"step": step, **heldout_metrics(head, held_feats, target,
                                                              args.eval_draft_tokens)}  # fmt: skip
                log.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
            log.flush()  # with the checkpoint: a run killed later keeps its log
        if out_of_time:
            print(f"stopped at step {step} (--max-minutes); run again to resume", flush=True)
            break
    return 0


class Order:
    """Which sequences step `n` trains on: epoch `e` visits every sequence once, in a
    permutation seeded by (seed, e), so a resumed run continues the same order."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.perms = n, seed, {}

    def batch(self, step: int, size: int) -> list[int]:
        index = []
        for j in range(step * size, (step + 1) * size):
            epoch, i = divmod(j, self.n)
            if epoch not in self.perms:
                self.perms[epoch] = torch.randperm(self.n, generator=torch.Generator().manual_seed(
                    self.seed * 100003 + epoch)).tolist()  # fmt: skip
            index.append(self.perms[epoch][i])
        return index


def learning_rate(args, step: int, trained_s: float, warm_from: int = 0) -> tuple[float, float]:
    """(learning rate, progress in [0, 1]): linear warm-up over `--warmup-steps` from step
    `warm_from` (0, or the step a run resumed at without its optimizer state), then cosine
    decay to `--min-lr-ratio` x `--lr` as training progresses, progress being the larger of
    step / `--steps` and training seconds / `--train-minutes` (the whole plan across calls,
    when given: a time-limited run still finishes its schedule)."""
    progress = step / args.steps
    if args.train_minutes:
        progress = max(progress, trained_s / (60 * args.train_minutes))
    warm = min(1.0, (step - warm_from + 1) / max(args.warmup_steps, 1))
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return args.lr * warm * (args.min_lr_ratio + (1 - args.min_lr_ratio) * cosine), progress


def init_from_target(head, target) -> None:
    """Start the head's output side as the target's: its final norm and LM head (where the
    shapes match), so that from the first step the head only has to predict the target's
    last hidden state instead of learning a vocabulary projection from scratch."""
    for ours, theirs in ((head.lm_head, target.lm_head), (head.norm, target.model.norm)):
        weight = getattr(theirs, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape == ours.weight.shape:
            ours.weight.data.copy_(weight.detach().float())


def export_state(model: str, out: str, dtype: str = "auto", device: str = "auto") -> int:
    """Write the servable head (`export`) from the state in `out` alone (`state.json` and its
    shards, e.g. carried to a fresh machine) and the target `model`; returns the state's step."""
    from pegboard.core.models import load_model
    from pegboard.core.speculative.eagle_state import load_state

    loaded = load_model(model, dtype, device, None, progress=False)
    cfg = head_config(json.loads((Path(model) / "config.json").read_text()),
                      default_aux(loaded.info.num_layers))  # fmt: skip
    head = build_head(cfg, loaded.model.eval(), loaded.info.device)
    step = load_state(head, None, Path(out))["step"]
    export(head, cfg, Path(out))
    return step


def export(head, cfg: dict, out: Path) -> None:
    """The head in SGLang's EAGLE-3 format (`config.json`, `model.safetensors`: every tensor,
    the target's LM head included), what serving loads."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().float().cpu().contiguous()
               for k, v in head.sglang_tensors().items() if v is not None}  # fmt: skip
    vocab = cfg["vocab_size"]
    tensors["d2t"] = torch.zeros(vocab, dtype=torch.int64)
    tensors["t2d"] = torch.ones(vocab, dtype=torch.bool)
    save_file(tensors, str(out / "model.tmp"))
    (out / "model.tmp").replace(out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
