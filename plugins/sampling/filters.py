"""Batched logit filters: top-k, top-p (nucleus) and min-p, each row with its own parameter.

Filters set excluded logits to -inf and never exclude a row's most likely token, so every row
keeps a non-empty support. They run on temperature-scaled logits, as in vLLM and HF.
"""

from __future__ import annotations

import torch


def apply_top_k_top_p(
    logits: torch.Tensor,
    top_k: torch.Tensor | None,
    top_p: torch.Tensor | None,
    candidates: int | None = None,
) -> torch.Tensor:
    """Mask all but each row's `top_k` largest logits, then all but the smallest set of most
    likely tokens whose probability mass reaches `top_p`.

    :param logits: `[n, vocab]` float logits (not modified).
    :param top_k: `[n]` int64, values `>= vocab` disable the filter for that row; or None.
    :param top_p: `[n]` float, `1.0` disables the filter for that row; or None.
    :param candidates: when every row has a top-k of at most this many, only that many
        largest logits per row are sorted (`topk`) instead of the whole vocabulary.
    :returns: a new `[n, vocab]` tensor with excluded entries at -inf.
    """
    vocab = logits.shape[-1]
    if candidates is not None and candidates < vocab:
        values, order = logits.topk(candidates, dim=-1)
    else:
        # Stable sort: among tied logits the lower token id ranks first, as argmax picks it.
        values, order = logits.sort(dim=-1, descending=True, stable=True)
    rank = torch.arange(values.shape[-1], device=logits.device)
    remove = torch.zeros_like(values, dtype=torch.bool)
    if top_k is not None:
        remove |= rank.unsqueeze(0) >= top_k.unsqueeze(1)
    if top_p is not None:
        probs = values.masked_fill(remove, float("-inf")).softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        # A token goes when the more likely ones already reach top_p; rows at 1.0 skip this
        # because the cumulative sum's rounding can exceed 1 and would clip the tail.
        remove |= (mass_before >= top_p.unsqueeze(1)) & (top_p < 1.0).unsqueeze(1)
    kept = values.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter_(1, order, kept)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Mask tokens whose probability is below `min_p` times the row's largest probability.

    Compared in log space (`logit < max_logit + log(min_p)`), which needs no softmax and gives
    the same set because the softmax normaliser cancels; `min_p == 0` keeps every token.
    """
    threshold = logits.amax(dim=-1, keepdim=True) + min_p.unsqueeze(1).log()
    return logits.masked_fill(logits < threshold, float("-inf"))
