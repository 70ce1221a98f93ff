"""`POST /start_profile` and `POST /stop_profile` (admin token): a torch profiler trace of the
engine's steps, as SGLang's endpoints of the same names.

`/start_profile {"output_dir": "/abs/dir"}` starts `torch.profiler` on the step-loop thread (the
profiler records the thread it was started on) at the loop's next turn; `/stop_profile` stops
it and writes a Chrome trace (`chrome://tracing`, Perfetto) into that directory, answering its
path. Each engine step shows as a `pegboard.step` range. The directory is created if missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request
from pegboard.core.server.errors import APIError
from pegboard.core.server.security import require_admin

log = logging.getLogger("pegboard.server")

#: Seconds an endpoint waits for the step loop to start or stop the profiler.
LOOP_WAIT_S = 120.0

router = APIRouter(tags=["admin"], dependencies=[Depends(require_admin)])


class StartProfile(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid", strict=True)

    output_dir: str = pydantic.Field(description="absolute directory the trace is written to")


class StepProfiler:
    """A step-loop observer (core/watchdog.py) that runs `torch.profiler` on the loop thread."""

    def __init__(self) -> None:
        self._requests: list[tuple[str, Path | None, Future]] = []
        self._lock = threading.Lock()
        self._profile: Any = None
        self._dir: Path | None = None

    @property
    def active(self) -> bool:
        return self._profile is not None

    def request(self, action: str, directory: Path | None = None) -> Future:
        future: Future = Future()
        with self._lock:
            self._requests.append((action, directory, future))
        return future

    def step(self, engine: Any):
        if self._profile is None:
            return contextlib.nullcontext()
        import torch

        return torch.profiler.record_function("pegboard.step")

    def between_steps(self, engine: Any) -> None:
        if not self._requests:
            return
        with self._lock:
            requests, self._requests = self._requests, []
        for action, directory, future in requests:
            try:
                future.set_result(self._start(directory) if action == "start" else self._stop())
            except Exception as e:
                future.set_exception(e)

    def _start(self, directory: Path) -> str:
        import torch

        if self._profile is not None:
            raise APIError(409, f"a profile is already running (into {self._dir})")
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profile = torch.profiler.profile(activities=activities, record_shapes=True)
        profile.start()
        self._profile, self._dir = profile, directory
        log.info("profiling the engine into %s", directory)
        return str(directory)

    def _stop(self) -> str:
        if self._profile is None:
            raise APIError(409, "no profile is running; POST /start_profile first")
        profile, directory = self._profile, self._dir
        self._profile = self._dir = None
        profile.stop()
        path = directory / f"pegboard-{time.strftime('%Y%m%d-%H%M%S')}-{time.time_ns()}.trace.json"
        profile.export_chrome_trace(str(path))
        log.info("profile written to %s", path)
        return str(path)


def step_profiler(engine: Any) -> StepProfiler:
    """The engine's profiler observer (added on first use)."""
    for observer in engine.observers:
        if isinstance(observer, StepProfiler):
            return observer
    profiler = StepProfiler()
    engine.observers.append(profiler)
    return profiler


async def _on_loop(http: Request, action: str, directory: Path | None = None) -> str:
    engine = http.app.state.server.require_engine()
    future = step_profiler(engine).request(action, directory)
    try:
        return await asyncio.wait_for(asyncio.wrap_future(future), LOOP_WAIT_S)
    except asyncio.TimeoutError as e:
        raise APIError(503, f"the step loop did not {action} the profiler in time") from e


@router.post("/start_profile")
async def start_profile(body: StartProfile, http: Request) -> dict:
    """Start a torch profiler trace of the engine's steps."""
    directory = Path(body.output_dir)
    if not directory.is_absolute():
        raise APIError(400, "output_dir must be an absolute path", "output_dir")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise APIError(400, f"cannot create {directory}: {e.strerror or e}", "output_dir") from e
    return {"status": "profiling", "output_dir": await _on_loop(http, "start", directory)}


@router.post("/stop_profile")
async def stop_profile(http: Request) -> dict:
    """Stop the trace and write it; answers the trace file's path."""
    return {"status": "stopped", "trace": await _on_loop(http, "stop")}
