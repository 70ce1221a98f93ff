"""The detokenizer's per-request bookkeeping, shared by `--detokenizer inline|thread` (keyed by
request id, in the engine's process) and `--detokenizer process` (keyed by a slot number, in the
detokenizer process): which `Detokenizer` a request has, and which requests already ended here
at a stop string (or a tokenizer error) while the engine still runs them.

`DetokenizerStates.feed` turns one token-level delta into its text and, when the delta is not
delivered as is, an event; `apply_event` applies that event to the delta in the engine's
process (finish it, tell the engine through `on_stop`, or drop it).

A request whose `SamplingParams.output_kind` is `"final"` keeps the texts of its deltas here
(where the decoding happens: the detokenizer's thread or process, not the step loop's) and is
`HELD` until it ends; the delta that ends it (a token stop, a stop string, an abort, a failure)
then carries the whole text, exactly the concatenation a `"delta"` request's deltas make.
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
HOLD = 3  # a "final" request's delta before its end: not delivered (its text is kept here)

Event = tuple[int, Any] | None
HELD: Event = (HOLD, None)  # the one HOLD event (`event is HELD`: the cheapest test)


class DetokenizerStates:
    """One `Detokenizer` per open request, and the requests that ended here early."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        #: detok, [output tokens fed], and for a "final" request its deltas' texts (else None)
        self._states: dict[Hashable, tuple[Detokenizer, list[int], list[str] | None]] = {}
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
        prompt open the request's state at its first delta (None: no state, no text).

        A "final" request's deltas are `HELD` but the last, whose text is the whole text."""
        try:
            text, event = self._feed(key, token_ids, finished, flush, params, prompt_token_ids)
        except Exception as e:  # a tokenizer bug: fail this request only, go on
            log.exception("detokenizing request %s failed", key)
            state = self._states.pop(key, None)
            if not finished:
                self._ended.add(key)
            text = "" if state is None or state[2] is None else "".join(state[2])
            return text, (FAIL, f"detokenization failed: {type(e).__name__}: {e}")
        return text, event

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
            kept = [] if params.output_kind == "final" else None
            state = self._states[key] = (detok, [0], kept)
        detok, count, kept = state
        if len(token_ids) > 1 and detok.stops:
            text = _add_one_at_a_time(detok, count, token_ids)
        else:
            count[0] += len(token_ids)
            text = detok.add(token_ids)
        event = None
        if detok.stop_reason is not None:
            if not finished:  # the engine runs it on: drop what it sends next
                self._ended.add(key)
            del self._states[key]
            event = (STOP, count[0])
        elif finished:
            if flush:
                text += detok.flush()
            del self._states[key]
        if kept is None:  # "delta": this delta's text
            return text, event
        return _final(kept, text, event, finished)

    def clear(self) -> None:
        self._states.clear()
        self._ended.clear()


def _add_one_at_a_time(detok: Detokenizer, count: list[int], token_ids: list[int]) -> str:
    """A verify step's tokens, fed one at a time so that a stop string ends the output at the
    token that completed it (`count[0]`: the request's output tokens fed so far)."""
    text = ""
    for token in token_ids:
        count[0] += 1
        text += detok.add([token])
        if detok.stop_reason is not None:
            break
    return text


def _final(kept: list[str], text: str, event: Event, finished: bool) -> tuple[str, Event]:
    """A "final" request's delta: `HELD` (its text kept) until the request ends; the last one
    carries every kept text, as the deltas would have concatenated."""
    if text:
        kept.append(text)
    if event is None and not finished:
        return "", HELD
    return "".join(kept), event


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
    if kind == DROP or kind == HOLD:
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
