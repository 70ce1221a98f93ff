"""`ngram`: prompt-lookup speculation (SGLang's NGRAM, vLLM's `[ngram]`): no model needed.

The draft is copied from the request's own context: find the most recent earlier occurrence
of the context's last n tokens (n from `max_ngram` down to `min_ngram`) and propose the tokens
that followed it. Extractive work (summaries, code edits, quoting) repeats its input, so the
guesses are often right; when nothing matches, no draft is proposed and the step is plain decode.

Each request keeps an index (in `request.plugin_state["ngram"]`) from every n-gram of its
context to where it last ended, extended by the tokens added since the previous step, so a
lookup costs O(max_ngram) per request and step whatever the context length.
"""

from __future__ import annotations

import pydantic
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, Request

STATE_KEY = "ngram"


class NgramOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    num_draft_tokens: int = pydantic.Field(4, ge=1, description="draft tokens per step at most")
    max_ngram: int = pydantic.Field(3, ge=1, description="longest suffix looked up")
    min_ngram: int = pydantic.Field(1, ge=1, description="shortest suffix looked up")


class NgramIndex:
    """n-gram -> the index of its last token, for the grams of `tokens[:indexed]` that end
    before the context's last token (the suffix being looked up never matches itself)."""

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n, self.max_n = min_n, max_n
        self.ends: dict[tuple[int, ...], int] = {}
        self.indexed = 0  # grams ending at positions < indexed are in `ends`

    def update(self, tokens: list[int]) -> None:
        if len(tokens) < self.indexed:  # cut back (a stop string): start over
            self.ends.clear()
            self.indexed = 0
        for end in range(self.indexed, len(tokens) - 1):
            for n in range(self.min_n, self.max_n + 1):
                if end - n + 1 >= 0:
                    self.ends[tuple(tokens[end - n + 1 : end + 1])] = end
        self.indexed = max(self.indexed, len(tokens) - 1)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            end = self.ends.get(tuple(tokens[len(tokens) - n :]))
            if end is not None:
                return tokens[end + 1 : end + 1 + k]
        return []


class NgramSpeculator(Speculator):
    """Drafts by looking the context's suffix up earlier in the context."""

    name = "ngram"
    Options = NgramOptions

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        o = self.options
        out = []
        for r, k in zip(requests, max_tokens):
            index = r.plugin_state.get(STATE_KEY)
            if index is None:
                index = r.plugin_state[STATE_KEY] = NgramIndex(o.min_ngram, o.max_ngram)
            index.update(r.token_ids)
            out.append(Drafts(index.lookup(r.token_ids, min(k, o.num_draft_tokens))))
        return out


def lookup(context: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    `context` (between `min_n` and `max_n` tokens long) that occurs earlier; [] if none."""
    index = NgramIndex(min_n, max_n)
    index.update(context)
    return index.lookup(context, k) if k > 0 else []
