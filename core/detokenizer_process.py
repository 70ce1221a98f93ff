"""`--detokenizer process`: detokenization, stop strings and the text of streamed deltas in a
process of their own (SGLang's DetokenizerManager layout), out of the step loop's interpreter.

The engine's process keeps only the bookkeeping of the step's deltas: `submit` gives each
request a slot number, sends the step's token ids to the detokenizer process
(`pegboard.core.detokenizer_worker`) as one message through a pipe, and keeps the deltas until
the answer comes back. A reader thread receives the answers; with a sink (the server's streams)
it delivers them itself, else `take()` (the offline `LLM`) applies them on its caller's thread.
A stop string ends a stream and reaches the engine through `on_stop` exactly as with
`--detokenizer inline|thread` (`pegboard.core.detokenizer_thread`), so outputs are the same.

**If the process dies** (killed, out of memory), every request it was detokenizing and every
later one fails with an error naming it ("the detokenizer process (pid P) exited with status
S"), and `on_lost(error)` is called once: the server then stops, as SGLang's does when its
detokenizer dies, exiting with status 3 after the open streams got their error. (A "final"
request's text lived in the process: its one output then has the error and no text.)

**"final" requests** (`SamplingParams.output_kind`) are held in the process: its answer lists
only the deltas to deliver, so a step where none of them ended costs `take()` no work per
request.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

from pegboard.core.detokenizer_states import FAIL, TOKEN_STOPS, apply_event, with_text
from pegboard.core.detokenizer_thread import DetokenizerThread
from pegboard.core.detokenizer_worker import FINISHED, FLUSH, READY, encode_step, new_request
from pegboard.core.outputs import RequestOutput

log = logging.getLogger("pegboard.detokenizer")


class DetokenizerLost(RuntimeError):
    """The detokenizer process exited while the engine was running."""


class DetokenizerProcess(DetokenizerThread):
    """The engine's end of the detokenizer process; the interface of `DetokenizerThread`."""

    def __init__(
        self,
        model_dir: str | Path,
        allow_missing: bool,
        on_stop: Callable[..., None],
        sink: Callable[[list[RequestOutput]], None] | None = None,
        wait: bool = True,
    ) -> None:
        """Start the process; with `wait=False` return at once (it loads its tokenizer while
        the caller goes on, e.g. loads the model) and call `ready()` before the first use."""
        super().__init__(None, on_stop, sink, threaded=False)
        #: Called once, on the reader thread, with the error when the process died.
        self.on_lost: Callable[[DetokenizerLost], None] | None = None
        child_in, to_child = os.pipe()
        from_child, child_out = os.pipe()
        argv = [
            sys.executable,
            "-m",
            "pegboard.core.detokenizer_worker",
            f"--model-dir={model_dir}",
            f"--in-fd={child_in}",
            f"--out-fd={child_out}",
        ] + (["--allow-missing"] if allow_missing else [])
        try:
            # its own session: a Ctrl-C or SIGTERM to the server's process group is not for it
            self.process = subprocess.Popen(
                argv, pass_fds=(child_in, child_out), start_new_session=True
            )
        finally:
            os.close(child_in)
            os.close(child_out)
        self._to_child = Connection(to_child, readable=False)
        self._from_child = Connection(from_child, writable=False)
        self._slots: dict[str, int] = {}  # request id -> slot in the process
        self._free: list[int] = []
        self._num_slots = 0
        self._batches: deque[list[RequestOutput]] = deque()  # sent, not answered yet
        self._answers: deque[bytes] = deque()  # answered, not applied yet
        self._ended: set[str] = set()  # streams ended here while the engine runs them on
        self._apply_lock = threading.Lock()  # answers are applied in order, by one thread
        self._closing = False
        self._reader = threading.Thread(
            target=self._read, name="pegboard-detokenizer-reader", daemon=True
        )
        if wait:
            self.ready()

    def ready(self) -> DetokenizerProcess:
        """Wait until the process has loaded its tokenizer, then read its answers; returns
        itself. Raises `DetokenizerLost` if it exited instead."""
        if not self._reader.is_alive():
            self._wait_ready()
            self._reader.start()
        return self

    def _wait_ready(self) -> None:
        """Wait until the process has loaded its tokenizer (as SGLang's server waits for its
        detokenizer), so the first requests do not run ahead of their text."""
        try:
            ready = self._from_child.recv_bytes() == READY
        except (EOFError, OSError):
            ready = False
        if not ready:
            status = self._exit_status()
            self._to_child.close()
            self._from_child.close()
            raise DetokenizerLost(
                f"the detokenizer process (pid {self.process.pid}) exited with status {status} "
                "while starting; its error is in the log above"
            )

    # ------------------------------------------------------------------ the step loop's side

    def submit(self, outputs: list[RequestOutput]) -> None:
        """Send one step's token ids to the process (the caller no longer touches `outputs`)."""
        if not outputs:
            return
        new, heads, tokens = [], [], []
        slots = self._slots
        with self._cond:
            self._unprocessed += 1
            lost = self.error is not None
            if not lost:
                self._batches.append(outputs)
        if lost:
            return self._fail(outputs)
        freed = []
        for out in outputs:
            ids = out.new_token_ids
            slot = slots.get(out.request_id)
            if slot is None and out.request is not None:
                slot = self._free.pop() if self._free else self._new_slot()
                slots[out.request_id] = slot
                new.append(new_request(slot, out.request))
            flags = 0
            if out.finished:
                flags = FINISHED | (FLUSH if out.finish_reason in TOKEN_STOPS else 0)
                if slot is not None:
                    freed.append(slots.pop(out.request_id))
            heads += (-1 if slot is None else slot, len(ids), flags)
            tokens += ids
        self._free += freed  # reused from the next message on: the process forgot them
        try:
            self._to_child.send_bytes(encode_step(new, heads, tokens))
        except OSError:  # it died: the reader thread fails this batch with the others
            pass

    def _new_slot(self) -> int:
        self._num_slots += 1
        return self._num_slots - 1

    def _takeable(self) -> bool:
        return bool(self._answers) or super()._takeable()

    def _collect(self) -> None:
        if self.sink is None:  # `take()`'s caller applies the answers (else the reader does)
            self._apply_answers()

    def close(self) -> None:
        self._closing = True
        try:
            self._to_child.send_bytes(b"")  # exit
        except OSError:
            pass
        try:
            self.process.wait(timeout=1.0)
        except subprocess.TimeoutExpired:  # still starting (or stuck): nothing is lost
            self.process.kill()
            self.process.wait()
        self._reader.join(timeout=5.0)
        self._to_child.close()
        self._from_child.close()
        super().close()

    # ------------------------------------------------------------------ the answers

    def _read(self) -> None:
        while True:
            try:  # unpickled where it is applied: the least GIL time on this thread
                answer = self._from_child.recv_bytes()
            except (EOFError, OSError):
                break
            with self._cond:
                self._answers.append(answer)
                self._cond.notify_all()
            if self.sink is not None:
                self._apply_answers()
        if not self._closing:
            self._lost()

    def _apply_answers(self) -> None:
        with self._apply_lock:
            while True:
                with self._cond:
                    if not self._answers:
                        return
                    answer = self._answers.popleft()
                    outputs = self._batches.popleft()
                texts, events, picks = pickle.loads(answer)
                if picks is not None:  # some were left out ("final" requests before their end)
                    outputs = [outputs[i] for i in picks]
                self._deliver(self._apply(outputs, texts, events))

    def _apply(self, outputs: list[RequestOutput], texts: list[str], events: list) -> list:
        """The delivered deltas with their texts and events (`outputs`: only those the process
        picked; a step of "final" requests none of which ended: none, and no work per request)."""
        if not events and not self._ended:  # most steps: no stop string, nothing to drop
            return list(map(with_text, outputs, texts))
        done, on_stop, ended = [], self.on_stop, self._ended
        events = {i: (kind, value) for i, kind, value in events}
        for i, (out, text) in enumerate(zip(outputs, texts)):
            event = events.get(i) if events else None
            out = with_text(out, text)
            if event is not None and not out.finished:
                ended.add(out.request_id)  # mirrors the process: for `_fail` once it is gone
            elif out.finished and ended:
                ended.discard(out.request_id)
            if apply_event(out, event, on_stop):
                done.append(out)
        return done

    # ------------------------------------------------------------------ its death

    def _exit_status(self) -> int:
        """Its exit status, once its pipe closed (killing it if it lives on regardless)."""
        try:
            return self.process.wait(timeout=5.0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def _lost(self) -> None:
        status = self._exit_status()
        self._apply_answers()  # what it answered before it died is delivered as usual
        error = DetokenizerLost(
            f"the detokenizer process (pid {self.process.pid}) exited with status {status}"
        )
        log.error("%s; failing the requests it was detokenizing", error)
        with self._cond:
            self.error = error
            batches, self._batches = list(self._batches), deque()
        for outputs in batches:
            self._fail(outputs)
        if self.on_lost is not None:
            self.on_lost(error)

    def _fail(self, outputs: list[RequestOutput]) -> None:
        """End the streams of `outputs` with the process's death (each once)."""
        with self._apply_lock:
            self._deliver(self._failed(outputs))

    def _failed(self, outputs: list[RequestOutput]) -> list[RequestOutput]:
        done, ended, message = [], self._ended, str(self.error)
        for out in outputs:
            rid = out.request_id
            if rid in ended:
                if out.finished:
                    ended.discard(rid)
                continue
            if not out.finished:
                ended.add(rid)
            out = with_text(out, "")
            apply_event(out, (FAIL, message), self.on_stop or _ignore)
            done.append(out)
        return done


def _ignore(*args) -> None:
    pass


def detokenizer_place(where: str, device) -> str:
    """`--detokenizer auto`: its own process on a CUDA device, where the step loop's host work
    is the bottleneck; inline on the CPU (no child process, the model is the bottleneck)."""
    if where != "auto":
        return where
    return "process" if str(device).startswith("cuda") else "inline"


def start_detokenizer(
    where: str,
    tokenizer,
    model_dir: Path,
    allow_missing: bool,
    on_stop: Callable[..., None],
    started: DetokenizerProcess | None = None,
) -> DetokenizerThread:
    """The engine's detokenizer for `--detokenizer inline|thread|process` (`started`: the
    process `spawn_detokenizer` started earlier, now waited for)."""
    if started is not None:
        return started.ready()
    if where == "process":
        return DetokenizerProcess(model_dir, allow_missing, on_stop)
    return DetokenizerThread(tokenizer, on_stop, threaded=where == "thread")


def spawn_detokenizer(
    where: str, model_dir: Path, allow_missing: bool, on_stop: Callable[..., None]
) -> DetokenizerProcess | None:
    """For `where == "process"`: the process, started without waiting for it (its torch and
    tokenizer imports, ~5 s on a small CPU, then overlap the model's load), else None."""
    if where != "process":
        return None
    return DetokenizerProcess(model_dir, allow_missing, on_stop, wait=False)
