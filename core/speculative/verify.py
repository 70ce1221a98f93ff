"""Verification of draft chains and trees against the target's logits: lossless by construction.

Greedy requests keep the longest path of drafts equal to the target's argmax, then the
target's argmax after it. Sampling requests use speculative (rejection) sampling (Leviathan et
al. 2023; Chen et al. 2023): draft token `d` drawn from `q` is accepted with probability
`min(1, p(d) / q(d))`; at the first rejection a token is drawn from `normalize(max(p - q, 0))`
and the chain ends; if every draft is accepted, a bonus token is drawn from the next `p`. Each
output token is then distributed exactly as plain sampling from `p` would give it. A draft
without `probs` is a point mass (`q(d) = 1`): accept with probability `p(d)`, and on rejection
draw from `p` with `d` removed. A tree tries a node's children one after another against what
is left of `p` (`accept_sampled`).

`p` is the target's distribution after the request's temperature, top-k, top-p and min-p
(the filters of `pegboard.plugins.sampling`), so speculation samples from what the sampler
would sample from. Random numbers come from the request's own generator
(`request.plugin_state["speculative"]`), seeded like the sampler's streams.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pegboard.core.speculative import tree as T
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


@dataclass
class Verdict:
    """A verification's result: the output tokens (accepted drafts, then one token of the
    target's) and `path`, the accepted drafts' indices in `Drafts.tokens`."""

    tokens: list[int]
    path: list[int]


def accept_greedy(target: list[int], drafts: Drafts) -> Verdict:
    """Greedy verification: from the request's last token, follow the child whose token is the
    target's argmax while there is one, then add the argmax. `target[n]` is the argmax at node
    `n` (0: the last token, `1 + i`: draft i); a chain is the tree of one child per node."""
    if drafts.parents is None:  # a chain: its longest prefix the target agrees with
        n, k, tokens = 0, len(drafts.tokens), drafts.tokens
        while n < k and tokens[n] == target[n]:
            n += 1
        return Verdict(target[: n + 1], list(range(n)))
    kids = T.children(drafts.parents or T.chain_parents(len(drafts.tokens)))
    tokens, path, node = [], [], 0
    while True:
        t = target[node]
        tokens.append(t)
        nxt = next((i for i in kids[node] if drafts.tokens[i] == t), None)
        if nxt is None:
            return Verdict(tokens, path)
        path.append(nxt)
        node = nxt + 1


def accept_sampled(probs: torch.Tensor, drafts: Drafts, generator: torch.Generator) -> Verdict:
    """Sampling verification, exact for chains and trees (SpecInfer's multi-candidate
    rejection sampling). `probs[n]` is the target's distribution at node `n` (as `target` of
    `accept_greedy`). At a node, its children are tried in order against the residual `r`
    (first `p`): child `d` drawn from `q` is accepted with probability `min(1, r(d) / q(d))`;
    on rejection `r = normalize(max(r - q, 0))` (a point mass: `r` without `d`). If every child
    is rejected a token is drawn from `r` and verification ends; a leaf's bonus token is drawn
    from its `p`. Each step is one round of speculative sampling, whose output is distributed
    as its `r`, so the output follows `p` exactly, provided siblings were drawn independently."""
    kids = T.children(drafts.parents or T.chain_parents(len(drafts.tokens)))
    tokens, path, node = [], [], 0
    while True:
        residual = probs[node]
        nxt = None
        for i in kids[node]:
            d = drafts.tokens[i]
            q = drafts.probs[i].to(residual) if drafts.probs is not None else None
            qd = float(q[d]) if q is not None else 1.0
            u = torch.rand((), generator=generator, device=residual.device).item()
            if qd > 0 and u * qd < float(residual[d]):
                nxt = i
                break
            rest = (residual - q).clamp_(min=0) if q is not None else residual.clone()
            if q is None:
                rest[d] = 0.0
            if float(rest.sum()) > 0:  # else r == q: rejection had probability 0; keep r
                residual = rest / rest.sum()
        if nxt is None:
            tokens.append(_draw(residual, generator))
            return Verdict(tokens, path)
        tokens.append(drafts.tokens[nxt])
        path.append(nxt)
        node = nxt + 1


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
