"""Incremental detokenization of one request's output, with stop strings."""

from __future__ import annotations

from typing import Any

from pegboard.sdk.types import SamplingParams

#: Prompt tokens decoded in front of the output, so that tokenizers whose decoding depends on
#: the left context (SentencePiece's leading-space rule) continue the prompt as vLLM does.
PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"  # what a byte-level decoder yields for an unfinished UTF-8 sequence


class Detokenizer:
    """Per-request incremental detokenization with stop strings.

    Decoding keeps two offsets into the token ids (vLLM's scheme): `prefix` starts the window of
    recent tokens that is decoded for context, `read` ends the part whose text was already
    produced. Each `add` decodes `ids[prefix:read]` and `ids[prefix:]` and yields the difference,
    so a token costs O(window) whatever the output length. Text is held back while it ends in an
    incomplete UTF-8 sequence, and while its end could still grow into a stop string.

    Invariant: the pieces returned by `add` and `flush`, concatenated, equal the tokenizer's
    decode of all output ids, cut before the first stop string if one occurred (`stop_reason`).
    """

    def __init__(self, tokenizer: Any, params: SamplingParams, prompt_token_ids: list[int]) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.stops = [s for s in params.stop if s]
        self._max_held = max((len(s) for s in self.stops), default=1) - 1
        self._pieces: list[str] = []  # the text emitted so far (`text`)
        self.stop_reason: str | None = None
        self._done = False
        self._held = ""  # decoded text that might be the start of a stop string
        context = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        # A context that decodes to an unfinished character would shift the text offsets.
        if self._decode(context).endswith(_INCOMPLETE):
            context = []
        self._ids = context
        self._prefix = 0
        self._read = len(context)

    def add(self, token_ids: list[int]) -> str:
        """Feed newly generated token ids; return the text that is safe to emit now."""
        if self._done or not token_ids:
            return ""
        ids, prefix, read = self._ids, self._prefix, self._read
        ids.extend(token_ids)
        prefix_text = self._decode(ids[prefix:read])
        full_text = self._decode(ids[prefix:])
        new_text = full_text[len(prefix_text) :]
        if full_text.endswith(_INCOMPLETE):
            # The finished characters before the incomplete tail may already hold a stop string.
            return self._scan(self._held + new_text.rstrip(_INCOMPLETE), final=False, commit=False)
        self._prefix, self._read = read, len(ids)
        if not self.stops:  # nothing to look for, nothing held back: `_scan` would emit it all
            self._pieces.append(new_text)
            return new_text
        return self._scan(self._held + new_text, final=False, commit=True)

    @property
    def text(self) -> str:
        """All the text emitted so far."""
        return "".join(self._pieces)

    def flush(self) -> str:
        """At finish: return what is still held back ("" once a stop string was hit)."""
        if self._done:
            return ""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])[len(prefix_text) :]
        piece = self._scan(self._held + new_text, final=True, commit=True)
        self._done = True
        return piece

    def _scan(self, pending: str, final: bool, commit: bool) -> str:
        """Emit `pending` up to the first stop string, or up to a suffix that could still
        become one (all of it when `final`). `commit=False` only looks for a stop string."""
        stop = self._first_stop(pending)
        if stop is not None:
            start, self.stop_reason = stop
            self._done = True
            return self._emit(pending[:start])
        if not commit:
            return ""
        keep = 0 if final else self._partial_stop_length(pending)
        self._held = pending[len(pending) - keep :] if keep else ""
        return self._emit(pending[: len(pending) - keep])

    def _emit(self, piece: str) -> str:
        self._pieces.append(piece)
        return piece

    def _first_stop(self, text: str) -> tuple[int, str] | None:
        """The stop string that completes first in `text` (ties: the one starting first), as
        (start, stop string); this is what token-by-token streaming would have found."""
        best = None
        for stop in self.stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best[0]:
                    best = (key, start, stop)
        return None if best is None else (best[1], best[2])

    def _partial_stop_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        for length in range(min(len(text), self._max_held), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self.stops):
                return length
        return 0

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
