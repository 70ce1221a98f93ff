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
        self._start = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = self.clock()
        else:
            self.runs[info["generation"]] += 1
            self.seconds += self.clock() - self._start

    def __enter__(self) -> GcTime:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def report(self) -> dict:
        return {"runs_by_generation": list(self.runs), "ms": round(self.seconds * 1e3, 3)}
