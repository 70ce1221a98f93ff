"""Batched repetition, frequency and presence penalties.

Semantics (as vLLM applies them, in this order):
- repetition penalty `r` (HF / CTRL): for every token that occurs in the prompt or the output,
  a positive logit is divided by `r` and a negative one multiplied by `r`;
- frequency penalty `f` (OpenAI): `logit -= f * count` of the token in the output;
- presence penalty `p` (OpenAI): `logit -= p` if the token occurs in the output at all.
"""

from __future__ import annotations

import torch
from pegboard.sdk.types import Request


def needs_penalties(requests: list[Request]) -> bool:
    """Whether any request in the batch asks for a penalty."""
    return any(
        r.params.presence_penalty != 0.0
        or r.params.frequency_penalty != 0.0
        or r.params.repetition_penalty != 1.0
        for r in requests
    )


def token_counts(
    token_lists: list[list[int]], vocab_size: int, device: torch.device
) -> torch.Tensor:
    """Count each token id per row: `[len(token_lists), vocab_size]` float32.

    Rows are padded with the id `vocab_size`, counted in a scratch column that is dropped.
    """
    width = max((len(t) for t in token_lists), default=0)
    padded = torch.full((len(token_lists), width), vocab_size, dtype=torch.int64)
    for i, tokens in enumerate(token_lists):
        padded[i, : len(tokens)] = torch.as_tensor(tokens, dtype=torch.int64)
    padded = padded.to(device, non_blocking=True).clamp_(0, vocab_size)
    counts = torch.zeros(len(token_lists), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """Return `logits` with each request's penalties applied (a new tensor)."""
    device, vocab = logits.device, logits.shape[-1]
    params = [r.params for r in requests]
    rep = torch.tensor([p.repetition_penalty for p in params]).to(device).unsqueeze(1)
    freq = torch.tensor([p.frequency_penalty for p in params]).to(device).unsqueeze(1)
    pres = torch.tensor([p.presence_penalty for p in params]).to(device).unsqueeze(1)

    # Only penalised rows pay for turning their token lists into tensors.
    uses_output = [p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params]
    uses_prompt = [p.repetition_penalty != 1.0 for p in params]
    output_counts = token_counts(
        [
            r.output_token_ids if u or v else []
            for r, u, v in zip(requests, uses_output, uses_prompt)
        ],
        vocab,
        device,
    )
    prompt_counts = token_counts(
        [r.prompt_token_ids if v else [] for r, v in zip(requests, uses_prompt)], vocab, device
    )

    seen = (prompt_counts + output_counts) > 0
    repeated = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, repeated, logits)
    return logits - freq * output_counts - pres * (output_counts > 0).to(logits.dtype)
