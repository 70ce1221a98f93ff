"""`pegboard spec train-eagle3`: train an EAGLE-3 head for a target by self-distillation.

1. Data (`OUT/data.jsonl`): the target answers prompts (`--prompts FILE`, one per line, or a
   built-in list of varied instructions) by sampling through pegboard's own engine; its
   outputs are the training text, so the head learns the target's distribution.
2. Features: per sequence, one target forward (pegboard's model, a dense causal attention)
   with the three auxiliary hidden states captured by the same hooks serving uses
   (`pegboard.core.speculative.hidden`) and the target's logits as the teacher.
3. Training-time test (EAGLE-3 / SpecForge): the head is unrolled `--ttt-steps` times; step
   `s` feeds on step `s - 1`'s outputs, and its queries see the real keys up to their own
   position plus their own row's keys of steps 1..s, exactly what drafting sees at
   inference. Loss: cross-entropy against the target's distribution, weighted 0.8^s.

Checkpoints (`OUT/checkpoint.pt`) are written every `--save-every` steps and when
`--max-minutes` is reached, and a run resumes from them; `OUT` always holds the latest head in
SGLang's EAGLE-3 format (`config.json`, `model.safetensors`), loadable with
`--speculative-algorithm EAGLE3 --speculative-draft-model-path OUT`.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import torch
from torch.nn import functional as F

PROMPTS = [
    "Explain how {} works to a curious teenager.",
    "Write a short story about {}.",
    "List five facts about {} and explain each.",
    "Write a Python function related to {} with comments.",
    "Summarise the history of {} in a few paragraphs.",
    "What are the pros and cons of {}?",
    "Write an email to a colleague about {}.",
    "Give step-by-step instructions for a task involving {}.",
    "Answer briefly: what is the most important thing to know about {}?",
    "Write a dialogue between two friends discussing {}.",
    "Compare {} with something similar and explain the differences.",
    "Write a haiku and then a limerick about {}.",
    "Explain {} to a five-year-old, then to an expert.",
    "What are common misconceptions about {}?",
    "Write a product description or advertisement involving {}.",
    "Create a quiz with three questions and answers about {}.",
]
TOPICS = ["photosynthesis", "the stock market", "a lighthouse keeper", "sorting algorithms",
          "the Roman empire", "electric cars", "baking bread", "black holes", "chess openings",
          "climate change", "a robot learning to paint", "HTTP caching", "volcanoes",
          "the French revolution", "machine learning", "gardening in winter", "the human heart",
          "public transport", "jazz music", "the moon landing", "recycling plastic", "coffee",
          "quantum computing", "a lost cat", "the immune system", "ancient Egypt",
          "renewable energy", "learning to swim", "databases and SQL", "glaciers",
          "a job interview", "earthquakes", "social media", "the Olympic games", "bees",
          "compound interest", "a mountain village", "vaccines", "writing a novel",
          "the internet", "dinosaurs", "time management", "a space station", "rainforests",
          "Shakespeare", "binary search trees", "the printing press", "city parks"]  # fmt: skip


class DenseCausal:
    """Attention without a KV cache for one whole sequence (feature extraction)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
            is_causal=True, enable_gqa=q.shape[1] != k.shape[1],
        )  # fmt: skip
        return out.transpose(0, 1)


def generate_data(args, out: Path) -> list[tuple[list[int], int]]:
    """Self-distillation text: the target's own answers (resumes a partial `data.jsonl`), as
    (token ids, prompt length) per sequence (0: a row written before prompt lengths were)."""
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    path = out / "data.jsonl"
    lines = [json.loads(line) for line in path.open()] if path.exists() else []
    rows = [(d["ids"], d.get("prompt_len", 0)) for d in lines]
    if len(rows) >= args.num_samples:
        return rows[: args.num_samples]
    if args.prompts:
        prompts = [p for p in Path(args.prompts).read_text().splitlines() if p.strip()]
    else:
        prompts = [t.format(topic) for topic in TOPICS for t in PROMPTS]
    rng = random.Random(args.seed + len(rows))
    with LLM(args.model, dtype=args.dtype, device=args.device) as llm:
        with path.open("a") as f:
            while len(rows) < args.num_samples:
                batch = [rng.choice(prompts) for _ in range(min(64, args.num_samples - len(rows)))]
                texts = [_chat(llm.tokenizer, p) for p in batch]
                params = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.8, top_p=0.95)
                for o in llm.generate(texts, params):
                    ids = list(o.prompt_token_ids) + list(o.token_ids)
                    rows.append((ids, len(o.prompt_token_ids)))
                    f.write(json.dumps({"ids": ids, "prompt_len": rows[-1][1]}) + "\n")
                print(f"data: {len(rows)}/{args.num_samples} sequences", flush=True)
    return rows


def _chat(tokenizer, prompt: str):
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    except Exception:  # a tokenizer without a chat template: the plain prompt
        return prompt


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


def ttt_loss(
    head, aux: torch.Tensor, ids: torch.Tensor, teacher: torch.Tensor, steps: int,
    prompt_len: int = 0,
):  # fmt: skip
    """The unrolled loss of one sequence (see the module docstring) and step 0's top-1 match
    over the rows predicting generated tokens (index >= `prompt_len`): serving drafts only
    those (the prompt's rows, the same few templates over and over, are easy to memorise)."""
    total, match = 0.0, 0.0
    for s, logits in enumerate(ttt_logits(head, aux, ids, steps)):
        target = teacher[s + 1 : s + 1 + logits.shape[0]]
        loss = -(target * logits.log_softmax(-1)).sum(-1).mean()
        total = total + (0.8**s) * loss
        if s == 0:
            hits = (logits.argmax(-1) == target.argmax(-1)).float()[max(prompt_len - 2, 0) :]
            match = hits.mean().item() if hits.numel() else 0.0
    return total, match


def ttt_logits(head, aux: torch.Tensor, ids: torch.Tensor, steps: int):
    """Per unrolled step `s`, the head's float32 draft-vocabulary logits `[rows, draft vocab]`:
    row `t` fed on the feature at `t` and tokens `t + 1 .. t + s + 1`, predicting token
    `t + s + 2` (what serving drafts at step `s` after a context ending at token `t + 1`)."""
    T = ids.shape[0]
    n = T - 1  # rows t = 0 .. T-2: feature at t, token t + 1
    emb_all = head.embed(ids).to(aux.dtype)
    hidden = head.fc(aux[:n])
    keys, values = [], []
    for s in range(steps):
        rows = T - s - 1  # token t + s + 1 must exist
        if rows < 2:
            break
        h = hidden[:rows]
        emb = emb_all[s + 1 : s + 1 + rows]
        x = torch.cat([head.input_layernorm(emb), head.hidden_norm(h)], dim=-1)
        pos = torch.arange(s, s + rows, device=ids.device)
        q = head.q_proj(x).view(rows, head.num_heads, head.head_dim)
        k = head.k_proj(x).view(rows, head.num_kv_heads, head.head_dim)
        v = head.v_proj(x).view(rows, head.num_kv_heads, head.head_dim)
        q, k = head.rotary(pos, q, k)
        keys.append(k)
        values.append(v)
        attn = _ttt_attention(head, q, keys, values, rows)
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
    for logits in ttt_logits(head, features, ids, len(drafts)):
        draft = int(logits[row].argmax())
        out.append(draft + int(head.d2t[draft]))
    return out


def _ttt_attention(head, q, keys, values, rows):
    """Row t of step s sees step 0's keys 0..t and its own row's keys of steps 1..s."""
    group = head.num_heads // head.num_kv_heads
    k0 = keys[0][:rows].repeat_interleave(group, dim=1)  # [rows, H, D]
    v0 = values[0][:rows].repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(head.head_dim)
    scores0 = torch.einsum("thd,shd->hts", q, k0) * scale
    causal = torch.ones(rows, rows, dtype=torch.bool, device=q.device).tril()
    scores0 = scores0.masked_fill(~causal, float("-inf"))
    diag = [
        (q * k[:rows].repeat_interleave(group, dim=1)).sum(-1).transpose(0, 1).unsqueeze(-1) * scale
        for k in keys[1:]
    ]  # each [H, rows, 1]
    probs = torch.cat([scores0, *diag], dim=-1).softmax(-1)
    out = torch.einsum("hts,shd->thd", probs[..., :rows], v0)
    for j, v in enumerate(values[1:]):
        out = out + probs[..., rows + j].transpose(0, 1).unsqueeze(-1) * v[:rows].repeat_interleave(
            group, dim=1
        )
    return out.reshape(rows, -1)


def train(args) -> int:
    from pegboard.core.models import load_model
    from pegboard.core.speculative.hidden import TargetHidden
    from pegboard.plugins.speculative.eagle import EagleHead

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data = generate_data(args, out)
    loaded = load_model(args.model, args.dtype, args.device, None, progress=False)
    target = loaded.model.eval()
    for p in target.parameters():
        p.requires_grad_(False)
    target_cfg = json.loads((Path(args.model) / "config.json").read_text())
    aux = default_aux(loaded.info.num_layers)
    cfg = head_config(target_cfg, aux)
    device = loaded.info.device
    head = EagleHead(cfg, True, target).to(device=device, dtype=torch.float32)
    for norm in (head.input_layernorm, head.hidden_norm, head.post_attention_layernorm, head.norm):
        torch.nn.init.ones_(norm.weight)  # the model's norms are allocated, not initialised
    head.embed.weight.requires_grad_(False)
    init_from_target(head, target)
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr)
    step = 0
    ckpt = out / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, map_location=device)
        head.load_state_dict(state["head"], strict=False)
        opt.load_state_dict(state["opt"])
        step = state["step"]
        print(f"resumed at step {step}", flush=True)
    hooks = TargetHidden(target, aux)
    rng = random.Random(args.seed + step)
    log = (out / "train_log.jsonl").open("a")
    data, held = split_heldout(data)

    def inputs(ids: list[int]):
        ids = torch.tensor(ids[: args.max_len], device=device)
        with torch.no_grad():
            final = target(ids, torch.arange(ids.shape[0], device=device), DenseCausal())
            return ids, target.compute_logits(final).float().softmax(-1), hooks.features().float()

    def heldout_top1() -> float:
        with torch.no_grad():
            return sum(ttt_loss(head, f, i, t, 1, n)[1]
                       for i, t, f, n in ((*inputs(ids), n) for ids, n in held[:16])
                       ) / len(held[:16])  # fmt: skip

    while step < args.steps:
        opt.zero_grad()
        losses, matches = [], []
        for ids, prompt_len in rng.sample(data, min(args.batch_size, len(data))):
            ids, teacher, features = inputs(ids)
            loss, match = ttt_loss(head, features, ids, teacher, args.ttt_steps, prompt_len)
            (loss / args.batch_size).backward()
            losses.append(float(loss.detach()))
            matches.append(match)
        torch.nn.utils.clip_grad_norm_(head.parameters(), 0.5)
        opt.step()
        step += 1
        record = {"step": step, "loss": sum(losses) / len(losses),
                  "top1_match": sum(matches) / len(matches)}  # fmt: skip
        log.write(json.dumps(record) + "\n")
        if step % 10 == 0:
            print(json.dumps(record), flush=True)
        out_of_time = time.monotonic() - started > 60 * args.max_minutes
        if step % args.save_every == 0 or step == args.steps or out_of_time:
            save(head, opt, step, cfg, out)
            if held:  # step 0's top-1 on generated tokens of sequences it never trained on
                record = {"step": step, "heldout_top1": heldout_top1()}
                log.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)
            log.flush()  # with the checkpoint: a run killed later keeps its log
        if out_of_time:
            print(f"stopped at step {step} (--max-minutes); run again to resume", flush=True)
            break
    hooks.remove()
    return 0


def split_heldout(data: list[tuple[list[int], int]]):
    """(training rows, held-out rows): every sequence of about 1 in 20 distinct prompts (when
    there are 10 or more) is held out, so `heldout_top1` measures text of prompts the head
    never saw (the same prompt's samples share long stretches)."""
    prompts = sorted({tuple(ids[:n]) for ids, n in data if n})
    if len(prompts) < 10:
        return data, []
    held = set(prompts[::20])
    keep = [(ids, n) for ids, n in data if tuple(ids[:n]) not in held]
    return keep, [(ids, n) for ids, n in data if tuple(ids[:n]) in held]


def init_from_target(head, target) -> None:
    """Start the head's output side as the target's: its final norm and LM head (where the
    shapes match), so that from the first step the head only has to predict the target's
    last hidden state instead of learning a vocabulary projection from scratch."""
    for ours, theirs in ((head.lm_head, target.lm_head), (head.norm, target.model.norm)):
        weight = getattr(theirs, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.shape == ours.weight.shape:
            ours.weight.data.copy_(weight.detach().float())


def save(head, opt, step: int, cfg: dict, out: Path) -> None:
    """The checkpoint to resume from, and the head in SGLang's EAGLE-3 format."""
    from safetensors.torch import save_file

    torch.save({"head": head.state_dict(), "opt": opt.state_dict(), "step": step}, out / "ckpt.tmp")
    (out / "ckpt.tmp").replace(out / "checkpoint.pt")
    tensors = {k: v.detach().float().cpu().contiguous()
               for k, v in head.sglang_tensors().items() if v is not None}  # fmt: skip
    vocab = cfg["vocab_size"]
    tensors["d2t"] = torch.zeros(vocab, dtype=torch.int64)
    tensors["t2d"] = torch.ones(vocab, dtype=torch.bool)
    save_file(tensors, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
