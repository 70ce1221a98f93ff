"""The cyclic garbage collector's runs and time during a measurement.

A full (generation 2) collection walks every tracked object of the process: with torch and
transformers loaded one took ~250 ms of CPU time on the team's CPU, as long as ~100 decode
steps of a tiny model at batch 64, so one that falls into a 0.5 s benchmark run moves its
tokens per second by tens of percent. Benchmarks report these figures next to their timings.
"""

from __future__ import annotations

import gc
import time


class GcTime:
    """While open: the collector's runs by generation and the time they took
    (`time.perf_counter`, or the clock given)."""

    def __init__(self, clock=time.perf_counter) -> None:
        self.clock = clock
        self.runs = [0, 0, 0]
        self.seconds = 0.0
        self.by_generation = [0.0, 0.0, 0.0]  # seconds
        self.longest = 0.0  # the longest single collection, seconds
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = self.clock()
        else:
            took = self.clock() - self._start
            self.runs[info["generation"]] += 1
            self.seconds += took
            self.by_generation[info["generation"]] += took
            self.longest = max(self.longest, took)

    def __enter__(self) -> GcTime:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def report(self) -> dict:
        return {
            "runs_by_generation": list(self.runs),
            "ms": round(self.seconds * 1e3, 3),
            "ms_by_generation": [round(s * 1e3, 3) for s in self.by_generation],
            "max_ms": round(self.longest * 1e3, 3),
            "frozen_objects": gc.get_freeze_count(),  # out of every collection's reach
        }


class StepTimes:
    """While open: the wall time of each `engine.step()` call (a collection inside the loop
    shows as one long step: `max_ms` against `p50_ms`)."""

    def __init__(self, engine, clock=time.perf_counter) -> None:
        self.engine = engine
        self.clock = clock
        self.seconds: list[float] = []

    def __enter__(self) -> StepTimes:
        step, own = self.engine.step, "step" in vars(self.engine)  # another profiler's wrapper

        def timed():
            start = self.clock()
            try:
                return step()
            finally:
                self.seconds.append(self.clock() - start)

        self.engine.step = timed
        self._restore = (
            (lambda: setattr(self.engine, "step", step))
            if own
            else (
                lambda: delattr(self.engine, "step")  # the class's method shows through again
            )
        )
        return self

    def __exit__(self, *exc: object) -> None:
        self._restore()

    def report(self) -> dict:
        ms = sorted(s * 1e3 for s in self.seconds)
        if not ms:
            return {"steps": 0}
        at = lambda q: round(ms[min(len(ms) - 1, int(q * len(ms)))], 3)  # noqa: E731
        return {"steps": len(ms), "p50_ms": at(0.5), "p99_ms": at(0.99), "max_ms": round(ms[-1], 3)}
