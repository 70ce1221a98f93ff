"""`ngram`: prompt-lookup speculation (SGLang's NGRAM, vLLM's `[ngram]`): no model needed.

The draft is copied from the request's own context: find the most recent earlier occurrence
of the context's last n tokens (n from `max_ngram` down to `min_ngram`) and propose the tokens
that followed it. Extractive work (summaries, code edits, quoting) repeats its input, so the
guesses are often right; when nothing matches, no draft is proposed and the step is plain decode.
"""

from __future__ import annotations

import pydantic
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, Request


class NgramOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    num_draft_tokens: int = pydantic.Field(4, ge=1, description="draft tokens per step at most")
    max_ngram: int = pydantic.Field(3, ge=1, description="longest suffix looked up")
    min_ngram: int = pydantic.Field(1, ge=1, description="shortest suffix looked up")
    window: int = pydantic.Field(4096, ge=1, description="context tokens searched (the last ones)")


class NgramSpeculator(Speculator):
    """Drafts by looking the context's suffix up earlier in the context."""

    name = "ngram"
    Options = NgramOptions

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        o = self.options
        return [
            Drafts(
                lookup(
                    r.token_ids[-o.window :], min(k, o.num_draft_tokens), o.min_ngram, o.max_ngram
                )
            )
            for r, k in zip(requests, max_tokens)
        ]


def lookup(context: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    `context` (between `min_n` and `max_n` tokens long) that occurs earlier; [] if none."""
    if k <= 0:
        return []
    size = len(context)
    for n in range(min(max_n, size - 1), min_n - 1, -1):
        suffix = context[size - n :]
        for start in range(size - n - 1, -1, -1):  # latest first, the suffix itself excluded
            if context[start : start + n] == suffix:
                return context[start + n : start + n + k]
    return []
