"""Batched repetition, frequency and presence penalties.

Semantics (as vLLM applies them, in this order):
- repetition penalty `r` (HF / CTRL): for every token that occurs in the prompt or the output,
  a positive logit is divided by `r` and a negative one multiplied by `r`;
- frequency penalty `f` (OpenAI): `logit -= f * count` of the token in the output;
- presence penalty `p` (OpenAI): `logit -= p` if the token occurs in the output at all.
"""

from __future__ import annotations

import numpy as np
import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.sampling import COLUMN, SamplingBatch, sampling_of
from pegboard.sdk.types import Request
from torch.nn.utils.rnn import pad_sequence

#: `plugin_state` key of a request's `TokenHistory`.
HISTORY_KEY = "sampler.history"


#: The `SamplingBatch` columns of the three penalties, in the order they are applied.
PENALTIES = ("repetition_penalty", "frequency_penalty", "presence_penalty")


class TokenHistory:
    """A request's prompt and output ids as CPU tensors, kept in `request.plugin_state`.

    Each step converts only the tokens appended since the last one, so penalties do not turn
    the whole context from Python ints into a tensor again (that costs ~25 ns per token).
    Output ids only ever grow in the engine; a shorter list is converted afresh.
    """

    def __init__(self, prompt_token_ids: list[int]) -> None:
        self.prompt = torch.tensor(prompt_token_ids, dtype=torch.int64)
        self.output = torch.empty(0, dtype=torch.int64)

    @classmethod
    def of(cls, request: Request) -> TokenHistory:
        history = request.plugin_state.get(HISTORY_KEY)
        if history is None:
            history = request.plugin_state[HISTORY_KEY] = cls(request.prompt_token_ids)
        return history

    def outputs(self, output_token_ids: list[int]) -> torch.Tensor:
        known = self.output.numel()
        if len(output_token_ids) < known:
            self.output = torch.tensor(output_token_ids, dtype=torch.int64)
        elif len(output_token_ids) > known:
            new = torch.tensor(output_token_ids[known:], dtype=torch.int64)
            self.output = torch.cat([self.output, new])
        return self.output


def token_counts(rows: list[torch.Tensor], vocab_size: int, device: torch.device) -> torch.Tensor:
    """Count each token id per row: `[len(rows), vocab_size]` float32.

    Rows are padded with the id `vocab_size`, counted in a scratch column that is dropped.
    """
    padded = pad_sequence(rows, batch_first=True, padding_value=vocab_size)
    padded = to_device(padded, device).clamp_(0, vocab_size)
    counts = torch.zeros(len(rows), vocab_size + 1, device=device)
    counts.scatter_add_(1, padded, torch.ones_like(padded, dtype=counts.dtype))
    return counts[:, :vocab_size]


def apply_penalties(
    logits: torch.Tensor, requests: list[Request], batch: SamplingBatch | None = None
) -> torch.Tensor:
    """Return `logits` with each request's penalties applied (a new tensor). `batch`: the
    rows' parameters (`SamplingBatch`), else read from the requests."""
    device, vocab = logits.device, logits.shape[-1]
    batch = batch if batch is not None else sampling_of(requests)
    columns = [COLUMN[name] for name in PENALTIES]
    table = batch.on_device(device)[:, columns].to(torch.float32)
    rep, freq, pres = (column.unsqueeze(1) for column in table.unbind(dim=1))

    # Only penalised rows carry their tokens; the others count nothing.
    none = torch.empty(0, dtype=torch.int64)
    prompts, outputs = [none] * len(requests), [none] * len(requests)
    repetition = batch.column("repetition_penalty") != 1.0
    penalised = repetition | (batch.values[:, columns[1:]] != 0.0).any(axis=1)
    for i in np.flatnonzero(penalised).tolist():
        history = TokenHistory.of(requests[i])
        prompts[i] = history.prompt if repetition[i] else none
        outputs[i] = history.outputs(requests[i].output_token_ids)
    output_counts = token_counts(outputs, vocab, device)
    prompt_counts = token_counts(prompts, vocab, device)

    seen = (prompt_counts + output_counts) > 0
    repeated = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, repeated, logits)
    return logits - freq * output_counts - pres * (output_counts > 0).to(logits.dtype)
