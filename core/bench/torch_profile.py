"""A torch-profiler window over a few engine steps: which kernels a step runs, how long each takes.

`pegboard bench offline --torch-profile DIR` opens this around the timed run. It records
`active` steps after skipping `wait` (so compilation and the first admissions stay out), then
writes `DIR/kernels.txt` (the CUDA kernels and collectives by total device time, per step) and
`DIR/trace.json` (a Chrome trace of the window: open it in chrome://tracing or Perfetto). Kernels
replayed from a CUDA graph are recorded one by one where CUPTI reports them (CUDA 12+).
"""

from __future__ import annotations

import os
from collections.abc import Callable


class TorchProfile:
    """Profile `active` engine steps of `engine` after `wait` steps; write into `out_dir`."""

    def __init__(self, engine, out_dir: str, wait: int = 40, active: int = 8) -> None:
        self.engine = engine
        self.out_dir = out_dir
        self.wait = wait
        self.active = active
        self._restore: Callable[[], None] | None = None
        self._prof = None

    def __enter__(self) -> TorchProfile:
        import torch.profiler as tp

        activities = [tp.ProfilerActivity.CPU]
        if self.engine.runner.device.type == "cuda":
            activities.append(tp.ProfilerActivity.CUDA)
        self._prof = tp.profile(
            activities=activities,
            # the profiler warms up on the last skipped steps (up to 2), so SKIP=0 records step 1
            schedule=tp.schedule(
                wait=self.wait - min(2, self.wait),
                warmup=min(2, self.wait),
                active=self.active,
                repeat=1,
            ),
            on_trace_ready=self._write,
        )
        self._prof.__enter__()
        step = self.engine.step

        def profiled_step():
            try:
                return step()
            finally:
                self._prof.step()

        self.engine.step = profiled_step
        self._restore = lambda: vars(self.engine).pop("step", None)
        return self

    def __exit__(self, *exc) -> None:
        self._restore()
        self._prof.__exit__(*exc)

    def _write(self, prof) -> None:
        os.makedirs(self.out_dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(self.out_dir, "trace.json"))
        by_device = "self_cuda_time_total" if self.engine.runner.device.type == "cuda" else None
        table = prof.key_averages().table(
            sort_by=by_device or "self_cpu_time_total", row_limit=60, max_name_column_width=70
        )
        with open(os.path.join(self.out_dir, "kernels.txt"), "w") as f:
            f.write(f"{self.active} engine steps after {self.wait}; totals over the window\n")
            f.write(table)
