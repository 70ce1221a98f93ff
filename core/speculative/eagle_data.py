"""Self-distillation data for `pegboard spec train-eagle3` (`train_eagle3.py`).

- Prompts: a large programmatic pool (templates x topics x asks, chat-wrapped), shuffled by
  seed; the first `--heldout-prompts` are held out (never trained on), the rest are used once
  each, in order, so that a run that resumes continues where the data stopped.
- Generation: pegboard's own engine, the prompts of a chunk in ONE `LLM.generate` call (the
  engine batches them up to `max_running_requests`, with CUDA graphs on a GPU): training
  prompts sampled at `--temperature` (a comma list, cycled, for diversity), held-out prompts
  greedily (what serving at temperature 0 meets, so a held-out chain that matches is what
  verify would accept).
- Features: the three auxiliary hidden states and the target's final hidden state (its
  logits are the teacher, recomputed per batch from it) captured by the serving hooks in
  padded prefill batches of about `--prefill-tokens` tokens (as SpecForge's offline capture),
  kept on the device for the whole run.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

TEMPLATES = [
    "Explain how {} works to a curious teenager.", "Write a short story about {}.",
    "List five facts about {} and explain each.", "Write a Python function related to {}.",
    "Summarise the history of {} in a few paragraphs.", "What are the pros and cons of {}?",
    "Write an email to a colleague about {}.", "Give step-by-step instructions involving {}.",
    "What is the most important thing to know about {}?", "Write a dialogue about {}.",
    "Compare {} with something similar.", "Write a poem about {}.",
    "Explain {} to a five-year-old.", "What are common misconceptions about {}?",
    "Write an advertisement involving {}.", "Create a quiz with answers about {}.",
    "Describe a typical day of someone who works with {}.", "Why does {} matter today?",
    "Write a news report about a surprising discovery in {}.", "How would you teach {}?",
    "What questions should a beginner ask about {}?", "Write a blog post introduction on {}.",
    "Give three tips for someone interested in {}.", "What might {} look like in 50 years?",
    "Write a diary entry from someone experiencing {}.", "Define {} and give an example.",
    "Argue for and against investing time in {}.", "Outline an essay about {}.",
    "Describe {} using an analogy.", "Write a recipe-style guide for {}.",
    "What are the main challenges of {}?", "Tell a joke about {}, then explain it.",
]  # fmt: skip
TOPICS = [
    "photosynthesis", "the stock market", "a lighthouse keeper", "sorting algorithms",
    "the Roman empire", "electric cars", "baking bread", "black holes", "chess openings",
    "climate change", "a robot learning to paint", "HTTP caching", "volcanoes",
    "the French revolution", "machine learning", "gardening in winter", "the human heart",
    "public transport", "jazz music", "the moon landing", "recycling plastic", "coffee",
    "quantum computing", "a lost cat", "the immune system", "ancient Egypt", "glaciers",
    "renewable energy", "learning to swim", "databases and SQL", "a job interview",
    "earthquakes", "social media", "the Olympic games", "bees", "compound interest",
    "a mountain village", "vaccines", "writing a novel", "the internet", "dinosaurs",
    "time management", "a space station", "rainforests", "Shakespeare", "city parks",
    "binary search trees", "the printing press", "ocean tides", "the water cycle",
    "friendship", "budgeting", "sleep", "the Silk Road", "electricity", "mushrooms",
    "linear algebra", "a thunderstorm", "the piano", "marathon training", "solar panels",
    "honeybees", "a haunted house", "prime numbers", "the Renaissance", "cloud computing",
    "a dragon", "wind turbines", "the periodic table", "meditation", "street food",
    "the Great Wall of China", "cybersecurity", "a school trip", "penguins", "inflation",
    "a detective", "origami", "the Amazon river", "robotics", "a first date",
    "nutrition", "the theory of evolution", "video games", "a pirate ship", "bicycles",
    "Mars", "democracy", "a wedding", "the speed of light", "knitting", "coral reefs",
    "a startup company", "recursion", "the Cold War", "wolves", "public speaking",
    "a snowstorm", "Python lists", "the Industrial Revolution", "tea ceremonies",
]  # fmt: skip
ASKS = ["", " Keep it short.", " Use simple words.", " Be detailed.", " Use a numbered list.",
        " Write in a friendly tone.", " Answer in one paragraph.", " Include an example."]  # fmt: skip


def prompt_pool(seed: int, path: str | None = None) -> list[str]:
    """Every prompt (`path`: one per line, else templates x topics x asks), shuffled by seed."""
    if path:
        prompts = [p for p in Path(path).read_text().splitlines() if p.strip()]
    else:
        prompts = [t.format(topic) + a for topic in TOPICS for t in TEMPLATES for a in ASKS]
    prompts = sorted(set(prompts))
    random.Random(seed).shuffle(prompts)
    return prompts


def split_prompts(pool: list[str], heldout: int) -> tuple[list[str], list[str]]:
    """(training prompts, held-out prompts): the held-out ones never reach training data."""
    heldout = min(heldout, len(pool) // 2)
    return pool[heldout:], pool[:heldout]


def _chat(tokenizer, prompt: str):
    try:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    except Exception:  # a tokenizer without a chat template: the plain prompt
        return prompt


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.open()] if path.exists() else []


def generate_data(
    args, out: Path, offset: int = 0
) -> tuple[list[tuple[list[int], int]], list, dict]:
    """(training rows, held-out rows, stats): rows are (token ids, prompt length). Training
    row `i` answers training prompt `offset + i` (cycling the pool): a new data round (a later
    call without the last round's `data.jsonl`) passes the prompts used so far. Resumes
    partial `data.jsonl` / `heldout.jsonl`; starts no chunk that would end after
    `--data-minutes` (judged by the last chunk's time) and then writes `data_done.json`, after
    which later runs (resuming) train on what is there. Stats: sequences and tokens generated,
    seconds in all and inside `generate` calls, tok/s of the latter, generate calls."""
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    train_path, held_path, done = out / "data.jsonl", out / "heldout.jsonl", out / "data_done.json"
    if not train_path.exists():  # a new round: the last round's end marker is not this one's
        done.unlink(missing_ok=True)
    train_rows, held_rows = _read(train_path), _read(held_path)
    train_prompts, held_prompts = split_prompts(
        prompt_pool(args.seed, args.prompts), args.heldout_prompts
    )
    temps = [float(t) for t in str(args.temperature).split(",")]
    todo_held = held_prompts[len(held_rows) :]
    stats = {"sequences": 0, "tokens": 0, "seconds": 0.0, "generate_s": 0.0, "generate_calls": 0}
    if (len(train_rows) >= args.num_samples or done.exists()) and not todo_held:
        return _rows(train_rows)[: args.num_samples], _rows(held_rows), stats
    settings = {"dtype": args.dtype, "device": args.device, "max_running_requests": args.gen_batch,
                "gpu_memory_utilization": 0.3}  # fmt: skip
    if str(args.device) != "cpu":
        settings["cuda_graph_max_bs"] = min(args.gen_batch, 512)
    started, last = time.monotonic(), 0.0
    with LLM(args.model, **settings) as llm:
        while todo_held or len(train_rows) < args.num_samples:
            if train_rows and time.monotonic() - started + last > 60 * args.data_minutes:
                print(f"data: stopped at {len(train_rows)} sequences (--data-minutes)", flush=True)
                done.write_text(json.dumps({"sequences": len(train_rows)}))
                break
            n = min(args.gen_chunk, args.num_samples - len(train_rows))
            first = len(train_rows)
            chunk = [train_prompts[(offset + first + i) % len(train_prompts)] for i in range(n)]
            params = [SamplingParams(max_tokens=args.max_new_tokens, temperature=temps[(first + i)
                      % len(temps)], top_p=0.95) for i in range(n)]  # fmt: skip
            greedy = SamplingParams(max_tokens=args.max_new_tokens, temperature=0.0)
            texts = [_chat(llm.tokenizer, p) for p in todo_held + chunk]
            t = time.monotonic()
            outs = llm.generate(texts, [greedy] * len(todo_held) + params)  # one batched call
            last = time.monotonic() - t
            stats["generate_s"] += last
            stats["generate_calls"] += 1
            for i, o in enumerate(outs):
                ids = list(o.prompt_token_ids) + list(o.token_ids)
                row = {"ids": ids, "prompt_len": len(o.prompt_token_ids)}
                (held_rows if i < len(todo_held) else train_rows).append(row)
                stats["sequences"] += 1
                stats["tokens"] += len(o.token_ids)
            _append(held_path, held_rows[len(held_rows) - len(todo_held) :])
            _append(train_path, train_rows[first:])
            todo_held = []
            print(f"data: {len(train_rows)}/{args.num_samples} sequences", flush=True)
    stats["seconds"] = round(time.monotonic() - started, 3)
    stats["generate_s"] = round(stats["generate_s"], 3)
    stats["tokens_per_s"] = round(stats["tokens"] / max(stats["generate_s"], 1e-9), 1)
    print("data: " + json.dumps(stats), flush=True)
    return _rows(train_rows)[: args.num_samples], _rows(held_rows), stats


def _append(path: Path, rows: list[dict]) -> None:
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def _rows(lines: list[dict]) -> list[tuple[list[int], int]]:
    return [(d["ids"], d.get("prompt_len", 0)) for d in lines]


@dataclass
class Features:
    """The captured sequences: ids `[N, T]` (right-padded), lengths and prompt lengths `[N]`,
    and per token, packed without padding (sequence `i` at rows `starts[i] ..`), auxiliary
    states `[tokens, 3h]` and final hidden states `[tokens, h]` (the target's dtype)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    prompt_lens: torch.Tensor
    starts: torch.Tensor
    aux: torch.Tensor
    final: torch.Tensor

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """`[B, T]` packed rows of sequences `index`, T their longest length (padding repeats
        a sequence's last row: no loss or metric reads it)."""
        lengths = self.lengths[index]
        pos = torch.arange(int(lengths.max()), device=lengths.device)
        return self.starts[index, None] + torch.minimum(pos[None], lengths[:, None] - 1)

    def batch(self, index: torch.Tensor, target):
        """A training batch cut to its longest sequence: (ids, lengths, prompt lengths, aux
        float32, the teacher's probabilities float32 `[B, T, vocab]`)."""
        rows = self.rows(index)
        B, T = rows.shape
        with torch.no_grad():
            teacher = target.compute_logits(self.final[rows.reshape(-1)]).float()
        return (self.ids[index, :T], self.lengths[index], self.prompt_lens[index],
                self.aux[rows].float(), teacher.view(B, T, -1).softmax(-1))  # fmt: skip


class PaddedCausal:
    """Attention for `B` right-padded sequences of `T` tokens each, flattened to `[B*T]` rows
    (a real token never sees the padding after it)."""

    def __init__(self, batch: int) -> None:
        self.batch = batch

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        B = self.batch
        q, k, v = (x.view(B, -1, *x.shape[1:]).transpose(1, 2) for x in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                             enable_gqa=q.shape[1] != k.shape[1])  # fmt: skip
        return out.transpose(1, 2).reshape(-1, out.shape[1], out.shape[-1])


@torch.no_grad()
def capture(target, hooks, rows: list[tuple[list[int], int]], max_len: int, device,
            prefill_tokens: int = 65536) -> Features:  # fmt: skip
    """Prefill every row (cut to `max_len`) through the target in padded batches of about
    `prefill_tokens` tokens, longest first, capturing `hooks`' features per token."""
    rows = [(ids[:max_len], n) for ids, n in rows]
    N, T = len(rows), max(len(ids) for ids, _ in rows)
    ids = torch.zeros(N, T, dtype=torch.long)
    for i, (r, _) in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
    ids = ids.to(device)
    lengths = torch.tensor([len(r) for r, _ in rows], device=device)
    prompt_lens = torch.tensor([n for _, n in rows], device=device)
    starts = torch.cumsum(lengths, 0) - lengths
    aux = final = None
    order = sorted(range(N), key=lambda i: -len(rows[i][0]))
    i = 0
    while i < N:
        width = len(rows[order[i]][0])
        group = order[i : i + max(1, prefill_tokens // width)]
        i += len(group)
        x = ids[group, :width]
        positions = torch.arange(width, device=device).repeat(len(group))
        out = target(x.reshape(-1), positions, PaddedCausal(len(group)))
        feats = hooks.features()
        if aux is None:
            total = int(lengths.sum())
            aux = torch.empty(total, feats.shape[-1], dtype=feats.dtype, device=device)
            final = torch.empty(total, out.shape[-1], dtype=out.dtype, device=device)
        index = torch.tensor(group, device=device)
        pos = torch.arange(width, device=device)
        real = (pos[None] < lengths[index, None]).reshape(-1)  # the group's unpadded rows
        dst = (starts[index, None] + pos[None]).reshape(-1)[real]
        aux[dst] = feats[real]
        final[dst] = out[real]
    return Features(ids, lengths, prompt_lens, starts, aux, final)
