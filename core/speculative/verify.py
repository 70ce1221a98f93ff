"""Verification of draft chains against the target's logits: lossless by construction.

Greedy requests keep the longest prefix of drafts equal to the target's argmax, then the
target's argmax after it. Sampling requests use speculative (rejection) sampling (Leviathan et
al. 2023; Chen et al. 2023): draft token `d` drawn from `q` is accepted with probability
`min(1, p(d) / q(d))`; at the first rejection a token is drawn from `normalize(max(p - q, 0))`
and the chain ends; if every draft is accepted, a bonus token is drawn from the next `p`. Each
output token is then distributed exactly as plain sampling from `p` would give it. A draft
without `probs` is a point mass (`q(d) = 1`): accept with probability `p(d)`, and on rejection
draw from `p` with `d` removed.

`p` is the target's distribution after the request's temperature, top-k, top-p and min-p
(the filters of `pegboard.plugins.sampling`), so speculation samples from what the sampler
would sample from. Random numbers come from the request's own generator
(`request.plugin_state["speculative"]`), seeded like the sampler's streams.
"""

from __future__ import annotations

import torch
from pegboard.plugins.sampling.filters import apply_min_p, apply_top_k_top_p
from pegboard.sdk.types import Drafts, Request, TokenLogprobs

GENERATOR_KEY = "speculative"
_MIX = 0x9E3779B97F4A7C15


def target_probs(logits: torch.Tensor, request: Request) -> torch.Tensor:
    """The distribution plain sampling draws from, per row of `logits` (`[n, vocab]`)."""
    p = request.params
    vocab = logits.shape[-1]
    scaled = logits.float() / p.temperature
    n = scaled.shape[0]
    if 0 < p.top_k < vocab or p.top_p < 1.0:
        top_k = torch.full((n,), p.top_k if 0 < p.top_k < vocab else vocab, device=logits.device)
        top_p = torch.full((n,), p.top_p, device=logits.device, dtype=scaled.dtype)
        scaled = apply_top_k_top_p(scaled, top_k, top_p)
    if p.min_p > 0.0:
        scaled = apply_min_p(scaled, torch.full((n,), p.min_p, device=logits.device))
    return scaled.softmax(dim=-1)


def accept_greedy(target: list[int], drafts: list[int]) -> list[int]:
    """Output tokens of a greedy request: the drafts matching the target's argmax `target`
    (one per verified position, `len(drafts) + 1`), then the target's token after them."""
    out = []
    for d, t in zip(drafts, target):
        if d != t:
            break
        out.append(d)
    out.append(target[len(out)])
    return out


def accept_sampled(probs: torch.Tensor, drafts: Drafts, generator: torch.Generator) -> list[int]:
    """Output tokens of a sampling request by rejection sampling. `probs` is `[k + 1, vocab]`,
    the target's distribution at the request's last token and after each of the k drafts."""
    out = []
    for i, d in enumerate(drafts.tokens):
        p = probs[i]
        q = drafts.probs[i].to(p) if drafts.probs is not None else None
        qd = float(q[d]) if q is not None else 1.0
        u = torch.rand((), generator=generator, device=p.device).item()
        if qd > 0 and u * qd < float(p[d]):
            out.append(d)
            continue
        residual = (p - q).clamp_(min=0) if q is not None else p.clone()
        if q is None:
            residual[d] = 0.0
        if float(residual.sum()) <= 0:  # p == q: rejection had probability 0; keep p
            residual = p
        out.append(_draw(residual, generator))
        return out
    out.append(_draw(probs[len(drafts.tokens)], generator))
    return out


def _draw(weights: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(weights / weights.sum(), 1, generator=generator))


def generator_for(request: Request, device: torch.device, seed: int) -> torch.Generator:
    """The request's random stream for verification: its own seed, else the engine's seed
    mixed with its arrival number (so runs reproduce)."""
    gen = request.plugin_state.get(GENERATOR_KEY)
    if gen is None:
        s = request.params.seed
        gen = torch.Generator(device=device)
        gen.manual_seed(s if s is not None else (seed * _MIX + request.seq) % 2**64)
        request.plugin_state[GENERATOR_KEY] = gen
    return gen


def logprobs_of(logits: torch.Tensor, tokens: list[int], num_top: int) -> list[TokenLogprobs]:
    """Each output token's logprob and the top alternatives from the raw logits (row `i` is
    the distribution output token `i` was chosen from)."""
    raw = logits[: len(tokens)].float().log_softmax(dim=-1)
    index = torch.tensor(tokens, device=raw.device).unsqueeze(1)
    chosen = raw.gather(1, index).squeeze(1).tolist()
    top_values, top_ids = raw.topk(max(num_top, 1), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(t, chosen[i], list(zip(top_ids[i][:num_top], top_values[i][:num_top])))
        for i, t in enumerate(tokens)
    ]
