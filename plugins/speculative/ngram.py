"""`ngram`: prompt-lookup speculation (SGLang's NGRAM, vLLM's `[ngram]`): no model needed.

The draft is copied from the request's own context: find the most recent earlier occurrence
of the context's last n tokens (n from `max_ngram` down to `min_ngram`) and propose the tokens
that followed it. Extractive work (summaries, code edits, quoting) repeats its input, so the
guesses are often right; when nothing matches, no draft is proposed and the step is plain decode.
A match close to the end (text looping over a short phrase) is continued periodically, so the
draft still has `num_draft_tokens` tokens (`follow`).
With `topk` > 1 the draft is a tree: the continuations of up to `topk` latest earlier
occurrences, merged where they agree (the latest one is the tree's first path), verified in one
forward.

Each request keeps its context as an array of 32-bit integers (in
`request.plugin_state["ngram"]`, `NgramIndex`), extended by the tokens added since the previous
step, and a lookup searches it backwards in C: no Python per context token, so a request that
drafted nothing for many steps (the on/off switch) costs its next lookup no more than usual.
"""

from __future__ import annotations

from array import array

import pydantic
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, Request

STATE_KEY = "ngram"


class NgramOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    num_draft_tokens: int = pydantic.Field(4, ge=1, description="draft tokens per step at most")
    topk: int = pydantic.Field(
        1, ge=1, description="continuations merged into a draft tree (1: a chain)"
    )
    num_steps: int | None = pydantic.Field(
        None, ge=1, description="a tree's depth (default: num_draft_tokens)"
    )
    max_ngram: int = pydantic.Field(3, ge=1, description="longest suffix looked up")
    min_ngram: int = pydantic.Field(1, ge=1, description="shortest suffix looked up")


class NgramIndex:
    """A request's context as 32-bit integers, searched backwards for the suffix being looked
    up (`bytes.rfind`, in C) among the grams that end before the context's last token (the
    suffix never matches itself); the latest `keep` occurrences, latest first.

    `update` appends the tokens added since the last call (one C copy), so a lookup costs the
    same whatever happened in between: after a stretch without drafts (the on/off switch kept
    speculation off for up to 256 steps) a probe does not first index every token decoded
    meanwhile. (Until session 12 this was a dict from each n-gram to where it ended, extended
    in Python per token and n: a probe at batch 64 after 128 undrafted steps spent ~22 ms on
    this CPU catching up, ~16 times a drafting step's whole lookup, and its tuples fed the
    garbage collector.)"""

    def __init__(self, min_n: int, max_n: int, keep: int = 1) -> None:
        self.min_n, self.max_n, self.keep = min_n, max_n, keep
        self.tokens = array("i")  # the context as of the last `update`

    def update(self, tokens: list[int]) -> None:
        seen, n = self.tokens, len(self.tokens)
        if len(tokens) < n or (n and tokens[n - 1] != seen[-1]):  # cut back (a stop string)
            del seen[:]
            n = 0
        seen += array("i", tokens[n:])  # (twice as fast as `extend` from a list)

    def lookup(self, tokens: list[int], k: int) -> list[int]:
        found = self.continuations(tokens, k)
        return found[0] if found else []

    def continuations(self, tokens: list[int], depth: int) -> list[list[int]]:
        """What followed each kept occurrence of the longest suffix found, latest first
        (`follow`: continued periodically where it reaches the context's end)."""
        context = self.tokens.tobytes()
        before_last = len(context) - _ITEM  # grams end before the last token
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            ends = self._ends(context, context[len(context) - n * _ITEM :], before_last)
            if ends:
                return [follow(tokens, e, depth) for e in ends]
        return []

    def _ends(self, context: bytes, gram: bytes, stop: int) -> list[int]:
        """The token indices where the latest `keep` occurrences of `gram` in `context[:stop]`
        end (byte matches that straddle tokens are skipped)."""
        ends, size = [], len(gram)
        while len(ends) < self.keep:
            at = context.rfind(gram, 0, stop)
            if at < 0:
                break
            if at % _ITEM == 0:
                ends.append((at + size) // _ITEM - 1)
            stop = at + size - 1  # the next one starts before `at`
        return ends


_ITEM = array("i").itemsize


def follow(tokens: list[int], end: int, depth: int) -> list[int]:
    """Up to `depth` tokens after index `end` of `tokens`. Where they run into the context's
    end, the context is taken to repeat with the period the match implies (the suffix recurs
    every `len(tokens) - 1 - end` tokens): a loop of a few tokens (text that repeats a short
    phrase) drafts `depth` tokens, not the few left before the end."""
    out = tokens[end + 1 : end + 1 + depth]
    period = len(tokens) - 1 - end  # >= 1 unless the index is stale (a context cut back)
    if period < 1 or not out:
        return out
    while len(out) < depth:
        out.append(out[len(out) - period])
    return out


def merge_tree(paths: list[list[int]], limit: int) -> Drafts:
    """The draft tree whose root-to-leaf paths are `paths` (shared prefixes merged), at most
    `limit` tokens, in the order the paths come: the first path is the tree's first path."""
    tokens: list[int] = []
    parents: list[int] = []
    child: dict[tuple[int, int], int] = {}  # (parent, token) -> index
    for path in paths:
        parent = -1
        for t in path:
            at = child.get((parent, t))
            if at is None:
                if len(tokens) == limit:
                    break
                at = child[(parent, t)] = len(tokens)
                tokens.append(t)
                parents.append(parent)
            parent = at
    return Drafts(tokens, parents=parents)


class NgramSpeculator(Speculator):
    """Drafts by looking the context's suffix up earlier in the context."""

    name = "ngram"
    Options = NgramOptions

    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        o = self.options
        out = []
        for r, k in zip(requests, max_tokens):
            index = r.plugin_state.get(STATE_KEY)
            if index is None or index.keep != o.topk:
                index = NgramIndex(o.min_ngram, o.max_ngram, o.topk)
                r.plugin_state[STATE_KEY] = index
            index.update(r.token_ids)
            k = min(k, o.num_draft_tokens)
            if o.topk == 1:
                out.append(Drafts(index.lookup(r.token_ids, k)))
                continue
            depth = min(o.num_steps or o.num_draft_tokens, k)
            out.append(merge_tree(index.continuations(r.token_ids, depth), k))
        return out


def lookup(context: list[int], k: int, min_n: int, max_n: int) -> list[int]:
    """Up to `k` tokens that followed the latest earlier occurrence of the longest suffix of
    `context` (between `min_n` and `max_n` tokens long) that occurs earlier; [] if none."""
    index = NgramIndex(min_n, max_n)
    index.update(context)
    return index.lookup(context, k) if k > 0 else []
