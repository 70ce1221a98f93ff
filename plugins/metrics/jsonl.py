"""The `jsonl` metrics exporter: one JSON object per snapshot, appended to a file.

For offline analysis (pandas, jq) and as the second consumer that shows `export_metrics`
broadcasting: it receives exactly the snapshots the `prometheus` exporter receives. Lines are
buffered and flushed every `flush_interval_s` (0: after every line) and on close; writes
from several threads are serialised by a lock.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from pathlib import Path
from typing import Any

import pydantic
from pegboard.sdk.slots import MetricsExporter, PluginContext
from pegboard.sdk.types import MetricsSnapshot, Request


class JsonlOptions(pydantic.BaseModel):
    """Options of the `jsonl` exporter."""

    model_config = pydantic.ConfigDict(extra="forbid")

    path: str = pydantic.Field("pegboard-metrics.jsonl", description="file to append to")
    flush_interval_s: float = pydantic.Field(
        1.0, ge=0.0, description="seconds between flushes; 0 flushes every line"
    )


class JsonlExporter(MetricsExporter):
    """Appends each snapshot as a JSON line; a finished request is summarised by its counts
    and timestamps (the snapshot's `Request` is not kept)."""

    Options = JsonlOptions

    def __init__(self, options: JsonlOptions | None = None) -> None:
        super().__init__(options)
        self._lock = threading.Lock()
        self._file = None
        self._last_flush = 0.0

    def setup(self, ctx: PluginContext, previous=None) -> None:
        path = Path(self.options.path).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", encoding="utf-8", buffering=1 << 16)
        self._last_flush = time.monotonic()

    def export_metrics(self, snapshot: MetricsSnapshot) -> None:
        line = json.dumps(snapshot_record(snapshot), separators=(",", ":")) + "\n"
        with self._lock:
            if self._file is None:
                return
            self._file.write(line)
            now = time.monotonic()
            if now - self._last_flush >= self.options.flush_interval_s:
                self._file.flush()
                self._last_flush = now

    def close(self) -> None:
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None


def snapshot_record(snapshot: MetricsSnapshot) -> dict[str, Any]:
    """The JSON-ready form of a snapshot."""
    record = {
        f.name: getattr(snapshot, f.name)
        for f in dataclasses.fields(snapshot)
        if f.name not in ("request", "plugin_errors")
    }
    record["plugin_errors"] = {f"{s}:{p}": n for (s, p), n in snapshot.plugin_errors.items()}
    if snapshot.request is not None:
        record["request"] = request_record(snapshot.request)
    return record


def request_record(r: Request) -> dict[str, Any]:
    return {
        "request_id": r.request_id,
        "finish_reason": r.finish_reason.value if r.finish_reason is not None else None,
        "error": r.error,
        "num_prompt_tokens": r.num_prompt_tokens,
        "num_output_tokens": r.num_output_tokens,
        "num_cached_tokens": r.num_cached_tokens,
        "num_preemptions": r.num_preemptions,
        "priority": r.priority,
        "arrival_time": r.arrival_time,
        "first_scheduled_time": r.first_scheduled_time,
        "first_token_time": r.first_token_time,
        "finished_time": r.finished_time,
    }
