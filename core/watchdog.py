"""Observers of the step loop, and the watchdog among them.

`AsyncEngine` runs each engine step inside `StepObservers.step()` and calls
`StepObservers.between_steps()` once per loop turn, idle or not, on the step-loop thread (the
torch profiler must be started and stopped on the thread it profiles).

The watchdog (`serve --watchdog-timeout S`): a step that has not finished S seconds after it
started is stuck (a plugin that hangs, a collective that waits for a lost rank, a deadlock).
The watchdog logs what the engine was doing — step number, running and waiting requests, the
active plugins, the step-loop thread's stack — and exits the process with
`WATCHDOG_EXIT_STATUS`, so that a supervisor (systemd, Kubernetes) restarts the server rather
than leaving it up and answering nothing.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any, Protocol

log = logging.getLogger("pegboard.watchdog")

#: Exit status of a server the watchdog stopped (documented in docs/serving.md).
WATCHDOG_EXIT_STATUS = 3


def stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` prints every thread's stack to the process's stderr: where a process
    that no watchdog covers (a tensor-parallel follower, a bench run) hangs."""
    try:
        faulthandler.register(signal.SIGUSR1, file=sys.__stderr__, all_threads=True)
    except (AttributeError, ValueError, OSError):  # no SIGUSR1 (Windows) or no real stderr
        pass


class StepObserver(Protocol):
    def step(self, engine: Any) -> Any:
        """A context manager around one engine step."""

    def between_steps(self, engine: Any) -> None:
        """Called once per loop turn on the step-loop thread, also while idle."""


class StepObservers(list):
    """The observers of one step loop (empty: each call costs a list check)."""

    @contextmanager
    def step(self, engine: Any) -> Iterator[None]:
        if not self:
            yield
            return
        with ExitStack() as stack:
            for observer in self:
                stack.enter_context(observer.step(engine))
            yield

    def between_steps(self, engine: Any) -> None:
        for observer in self:
            observer.between_steps(engine)


class StepWatchdog:
    """Exit the process when one step runs longer than `timeout` seconds."""

    def __init__(self, timeout: float, on_stuck: Callable[[str], None] | None = None) -> None:
        if timeout <= 0:
            raise ValueError(f"--watchdog-timeout must be positive, got {timeout}")
        self.timeout = timeout
        self.on_stuck = on_stuck or _exit
        self._started: float | None = None  # monotonic start of the step in progress
        self._step_thread: int | None = None
        self._engine: Any = None
        self._changed = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._watch, name="pegboard-watchdog", daemon=True)
        self._thread.start()

    @contextmanager
    def step(self, engine: Any) -> Iterator[None]:
        with self._changed:
            self._started, self._engine = time.monotonic(), engine
            self._step_thread = threading.get_ident()
            self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._started = None
                self._changed.notify()

    def between_steps(self, engine: Any) -> None:
        pass

    def close(self) -> None:
        with self._changed:
            self._closed = True
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while not self._closed:
                if self._started is None:
                    self._changed.wait()
                    continue
                started = self._started
                left = started + self.timeout - time.monotonic()
                if left > 0:
                    self._changed.wait(left)
                    continue
                report = self.describe(time.monotonic() - started)
                break
            else:
                return
        log.critical("%s", report)
        self.on_stuck(report)

    def describe(self, elapsed: float) -> str:
        """What the stuck engine was doing, for the log."""
        engine = self._engine
        lines = [
            f"watchdog: engine step {getattr(engine, 'num_steps', '?')} has not finished after "
            f"{elapsed:.1f} s (--watchdog-timeout {self.timeout:g}); exiting with status "
            f"{WATCHDOG_EXIT_STATUS}",
        ]
        try:
            lines.append(
                f"running {len(engine.running)} request(s) "
                f"{[r.request_id for r in engine.running][:8]}, waiting {len(engine.waiting)}"
            )
            active = {
                slot: [p.name for p in engine.plugins.active_all(slot)]
                for slot in ("scheduler", "kv_cache", "attention", "sampler", "metrics")
            }
            lines.append(f"active plugins: {active}")
        except Exception as e:  # describing must never stop the exit
            lines.append(f"(engine state unavailable: {type(e).__name__}: {e})")
        frame = sys._current_frames().get(self._step_thread)
        if frame is not None:
            lines.append("step-loop thread stack (most recent call last):")
            lines.extend(line.rstrip() for line in traceback.format_stack(frame))
        return "\n".join(lines)


def _exit(report: str) -> None:
    for handler in logging.getLogger().handlers:
        handler.flush()
    sys.stderr.flush()
    os._exit(WATCHDOG_EXIT_STATUS)  # the step thread is stuck: a clean shutdown would hang
