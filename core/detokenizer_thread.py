"""Detokenization, stop strings and streaming output, off the step loop (as SGLang's
DetokenizerManager).

The step loop only appends token ids and checks token-level stops (EOS, stop token ids,
max tokens, context length); each `Engine.step()` hands its token-level deltas to a
`DetokenizerThread`, which decodes them incrementally (`Detokenizer`, one per request), looks
for stop strings, and delivers text deltas to a sink (the server's streams) or to `take()`
(the offline `LLM`).

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
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable

from pegboard.core.detokenizer import Detokenizer
from pegboard.core.outputs import RequestOutput
from pegboard.sdk.types import FinishReason

log = logging.getLogger("pegboard.detokenizer")

#: Finish reasons set by a token (EOS, stop token id, length): the held-back text is flushed.
_TOKEN_STOPS = (FinishReason.STOP, FinishReason.LENGTH)


class DetokenizerThread:
    """Turn token-level `RequestOutput`s into text deltas on a daemon thread.

    `submit(outputs)` (the step loop) never waits. Text deltas go to `sink(outputs)` when one
    is set (called on this thread), else they queue for `take()`. With `threaded=False`
    (`--detokenizer inline`, the default), `submit` does the same work on the caller's thread
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
        self._states: dict[str, tuple[Detokenizer, list[int]]] = {}  # detokenizer, [tokens]
        self._stopped: set[str] = set()  # ended here at a stop string; engine deltas dropped
        self.error: BaseException | None = None
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
        with self._cond:
            if wait and not self._ready:
                self._cond.wait_for(lambda: self._ready or not self._unprocessed, timeout)
            ready, self._ready = list(self._ready), deque()
        return ready

    def close(self) -> None:
        if self._thread is not None:
            self._inbox.put(None)
            self._thread.join(timeout=5.0)
        # Drop the references back to the engine (and its device memory) now, not at the
        # next garbage collection: the engine holds this object and `on_stop` holds the engine.
        self.on_stop = self.sink = None
        self._states.clear()
        self._ready.clear()

    # ------------------------------------------------------------------ the thread

    def _loop(self) -> None:
        while True:
            outputs = self._inbox.get()
            if outputs is None:
                return
            self._deliver(self._process_batch(outputs))

    def _process_batch(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        done = []
        for out in outputs:
            # a copy: the step loop returned the original to its caller
            out = RequestOutput(
                out.request_id,
                out.new_token_ids,
                "",
                out.new_logprobs,
                out.finished,
                out.finish_reason,
                out.error,
                out.request,
            )
            try:
                keep = self._process(out)
            except Exception as e:  # a tokenizer bug: fail this request only, go on
                log.exception("detokenizing request %s failed", out.request_id)
                keep = self._failed(out, e)
            if keep:
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

    def _process(self, out: RequestOutput) -> bool:
        """Add `out`'s text (and, at a stop string, its end); False: drop it."""
        rid = out.request_id
        if rid in self._stopped:  # ended here (stop string, error): the engine's late deltas
            if out.finished:
                self._stopped.discard(rid)
            return False
        state = self._states.get(rid)
        if state is None:
            if out.request is None:  # nothing to decode against
                return True
            r = out.request
            detok = Detokenizer(self.tokenizer, r.params, r.prompt_token_ids)
            state = self._states[rid] = (detok, [0])
        detok, count = state
        count[0] += len(out.new_token_ids)
        out.text = detok.add(out.new_token_ids)
        if detok.stop_reason is not None:
            if not out.finished:  # the engine runs it on: drop what it sends next
                self._stopped.add(rid)
            out.finished, out.finish_reason, out.error = True, FinishReason.STOP, None
            if out.request is not None:
                self.on_stop(out.request, count[0])  # before the stream sees its end
            del self._states[rid]
        elif out.finished:
            if out.finish_reason in _TOKEN_STOPS:
                out.text += detok.flush()
            del self._states[rid]
        return True

    def _failed(self, out: RequestOutput, error: BaseException) -> bool:
        self.error = error
        self._states.pop(out.request_id, None)
        message = f"detokenization failed: {type(error).__name__}: {error}"
        if not out.finished:
            self._stopped.add(out.request_id)
        out.finished, out.finish_reason, out.error = True, FinishReason.ERROR, message
        if out.request is not None:
            self.on_stop(out.request, None, message)
        return True
