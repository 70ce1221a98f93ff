"""Detokenization, stop strings and streaming output, off the step loop (as SGLang's
DetokenizerManager).

The step loop only appends token ids and checks token-level stops (EOS, stop token ids,
max tokens, context length); each `Engine.step()` hands its token-level deltas to a
`DetokenizerThread`, which decodes them incrementally (`Detokenizer`, one per request), looks
for stop strings, and delivers text deltas to a sink (the server's streams) or to `take()`
(the offline `LLM`). `--detokenizer process` puts the same work in a process of its own
(`pegboard.core.detokenizer_process`, a subclass); the per-request bookkeeping of all three is
`pegboard.core.detokenizer_states`.

**A stop string found here.** The engine has already run the request on for a step or two. This
thread then ends the request's stream itself: the delta of the token that completed the stop
string is the last one (finish reason `stop`, text cut before the stop string, exactly as when
detokenizing inside the step); the request's later deltas are dropped. It tells the engine
through `on_stop(request, num_output_tokens)` — before delivering that last delta — and the
engine, at its next step boundary, trims the request's output tokens (and logprobs) back to
that many and finishes it with `stop`, freeing its KV (`Engine._apply_stops`). (A tokenizer
that raises: `on_stop(request, None, error)` fails the request.) So token ids,
text, logprobs and streaming deltas are the same as before; the device computed one or two
tokens more for such a request.

**`output_kind="final"` requests** (`LLM.generate`'s) get no delta until they end, then one
output: the engine's last delta carrying the whole text (`pegboard.core.detokenizer_states`);
its `new_token_ids`/`new_logprobs` stay that last step's, the whole output's are on `request`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

from pegboard.core.detokenizer_states import (
    HELD,
    TOKEN_STOPS,
    DetokenizerStates,
    apply_event,
    with_text,
)
from pegboard.core.outputs import RequestOutput

log = logging.getLogger("pegboard.detokenizer")


class DetokenizerThread:
    """Turn token-level `RequestOutput`s into text deltas on a daemon thread.

    `submit(outputs)` (the step loop) never waits. Text deltas go to `sink(outputs)` when one
    is set (called on this thread), else they queue for `take()`. With `threaded=False`
    (`--detokenizer inline`, the default on the CPU), `submit` does the same work on the caller's thread
    right after the step: a stop string then ends the request at the next step boundary,
    trimmed the same way.
    """

    def __init__(
        self,
        tokenizer,
        on_stop: Callable[..., None],
        sink: Callable[[list[RequestOutput]], None] | None = None,
        threaded: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.on_stop = on_stop
        self.sink = sink
        self._inbox: queue.SimpleQueue[list[RequestOutput] | None] = queue.SimpleQueue()
        self._ready: deque[RequestOutput] = deque()
        self._cond = threading.Condition()
        self._unprocessed = 0  # submitted batches not processed yet
        self.states = DetokenizerStates(tokenizer)
        self.error: BaseException | None = None  # what ended the detokenizer (a process's death)
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(
                target=self._loop, name="pegboard-detokenizer", daemon=True
            )
            self._thread.start()

    def submit(self, outputs: list[RequestOutput]) -> None:
        """Queue one step's token-level deltas (the caller no longer touches them)."""
        if not outputs:
            return
        with self._cond:
            self._unprocessed += 1
        if self._thread is None:  # `--detokenizer inline`: on the caller's thread
            self._deliver(self._process_batch(outputs))
        else:
            self._inbox.put(outputs)

    def busy(self) -> bool:
        """Whether deltas are still being processed or wait in `take()`'s queue."""
        with self._cond:
            return bool(self._unprocessed or self._ready)

    def take(self, wait: bool = False, timeout: float = 1.0) -> list[RequestOutput]:
        """The text deltas ready now; with `wait`, first wait (up to `timeout` s) until some are
        ready or nothing is being processed."""
        self._collect()
        with self._cond:
            if wait and not self._ready:
                self._cond.wait_for(self._takeable, timeout)
        self._collect()
        with self._cond:
            ready, self._ready = list(self._ready), deque()
        return ready

    def _takeable(self) -> bool:
        return bool(self._ready or not self._unprocessed)

    def _collect(self) -> None:
        """Make what is done ready for `take` (here it already is)."""

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=5.0)
        # Drop the references back to the engine (and its device memory) now, not at the
        # next garbage collection: the engine holds this object and `on_stop` holds the engine.
        self.on_stop = self.sink = None
        self.states.clear()
        self._ready.clear()

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            outputs = self._inbox.get()
            if outputs is None:
                return
            self._deliver(self._process_batch(outputs))

    def _process_batch(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        done, feed, on_stop = [], self.states.feed, self.on_stop
        for out in outputs:
            r = out.request
            text, event = feed(
                out.request_id,
                out.new_token_ids,
                out.finished,
                out.finish_reason in TOKEN_STOPS,
                r and r.params,
                r and r.prompt_token_ids,
            )
            if event is HELD:  # a "final" request before its end: no output object at all
                continue
            out = with_text(out, text)
            if apply_event(out, event, on_stop):
                done.append(out)
        return done

    def _deliver(self, done: list[RequestOutput]) -> None:
        if self.sink is not None and done:
            try:
                self.sink(done)
            except Exception:
                log.exception("delivering detokenized outputs failed")
        with self._cond:
            if self.sink is None:
                self._ready.extend(done)
            self._unprocessed -= 1
            self._cond.notify_all()
