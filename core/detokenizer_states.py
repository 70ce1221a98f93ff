"""The detokenizer's per-request bookkeeping, shared by `--detokenizer inline|thread` (keyed by
request id, in the engine's process) and `--detokenizer process` (keyed by a slot number, in the
detokenizer process): which `Detokenizer` a request has, and which requests already ended here
at a stop string (or a tokenizer error) while the engine still runs them.

`DetokenizerStates.feed` turns one token-level delta into its text and, when the delta is not
delivered as is, an event; `apply_event` applies that event to the delta in the engine's
process (finish it, tell the engine through `on_stop`, or drop it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable
from typing import Any

from pegboard.core.detokenizer import Detokenizer
from pegboard.core.outputs import RequestOutput
from pegboard.sdk.types import FinishReason, SamplingParams

log = logging.getLogger("pegboard.detokenizer")

#: Events of `DetokenizerStates.feed` (None: deliver the delta with its text).
DROP = 0  # a late delta of a request that already ended here: not delivered
STOP = 1  # a stop string ended the request at this delta; value: its output token count
FAIL = 2  # the tokenizer raised; value: the error message

Event = tuple[int, Any] | None


class DetokenizerStates:
    """One `Detokenizer` per open request, and the requests that ended here early."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._states: dict[Hashable, tuple[Detokenizer, list[int]]] = {}  # detok, [tokens]
        self._ended: set[Hashable] = set()  # ended here; the engine's later deltas are dropped

    def feed(
        self,
        key: Hashable,
        token_ids: list[int],
        finished: bool,
        flush: bool,
        params: SamplingParams | None,
        prompt_token_ids: list[int] | None,
    ) -> tuple[str, Event]:
        """The text of one delta of request `key` (`finished`: the engine's last; `flush`: it
        ended on a token, so the held-back text is released) and its event. `params` and the
        prompt open the request's state at its first delta (None: no state, no text)."""
        try:
            return self._feed(key, token_ids, finished, flush, params, prompt_token_ids)
        except Exception as e:  # a tokenizer bug: fail this request only, go on
            log.exception("detokenizing request %s failed", key)
            self._states.pop(key, None)
            if not finished:
                self._ended.add(key)
            return "", (FAIL, f"detokenization failed: {type(e).__name__}: {e}")

    def _feed(self, key, token_ids, finished, flush, params, prompt_token_ids):
        if key in self._ended:
            if finished:
                self._ended.discard(key)
            return "", (DROP, None)
        state = self._states.get(key)
        if state is None:
            if params is None:  # nothing to decode against
                return "", None
            detok = Detokenizer(self.tokenizer, params, prompt_token_ids or [])
            state = self._states[key] = (detok, [0])
        detok, count = state
        if len(token_ids) > 1 and detok.stops:  # (a verify step's tokens: one at a time, so
            text = ""  # that a stop string ends the output at the token that completed it)
            for token in token_ids:
                count[0] += 1
                text += detok.add([token])
                if detok.stop_reason is not None:
                    break
        else:
            count[0] += len(token_ids)
            text = detok.add(token_ids)
        if detok.stop_reason is not None:
            if not finished:  # the engine runs it on: drop what it sends next
                self._ended.add(key)
            del self._states[key]
            return text, (STOP, count[0])
        if finished:
            if flush:
                text += detok.flush()
            del self._states[key]
        return text, None

    def clear(self) -> None:
        self._states.clear()
        self._ended.clear()


#: Finish reasons set by a token (EOS, stop token id, length): the held-back text is flushed.
TOKEN_STOPS = (FinishReason.STOP, FinishReason.LENGTH)


def with_text(out: RequestOutput, text: str) -> RequestOutput:
    """A copy of the engine's delta with its text (the step loop returned the original)."""
    return RequestOutput(
        out.request_id,
        out.new_token_ids,
        text,
        out.new_logprobs,
        out.finished,
        out.finish_reason,
        out.error,
        out.request,
    )


def apply_event(out: RequestOutput, event: Event, on_stop: Callable[..., None]) -> bool:
    """Apply `feed`'s event to the text delta `out`; False: drop it. A stop string or a
    failure ends the stream here and tells the engine (`on_stop`) before the stream sees it."""
    if event is None:
        return True
    kind, value = event
    if kind == DROP:
        return False
    if kind == STOP:
        out.finished, out.finish_reason, out.error = True, FinishReason.STOP, None
        if out.request is not None:
            on_stop(out.request, value)
    else:
        out.finished, out.finish_reason, out.error = True, FinishReason.ERROR, value
        if out.request is not None:
            on_stop(out.request, None, value)
    return True
