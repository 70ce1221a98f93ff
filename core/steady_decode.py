"""The steady decode step: the last decode step's requests (less any that left), each one
token further.

Almost every step of a long generation is one. The attention backend's metadata for it barely
changes: each sequence length grows by one, and only a request whose new token starts a page
(one step in `page_size`) gains a page-table entry; yet uploading it whole again (every
sequence length, the `[requests, pages]` page table) costs host time every step.
`SteadyDecode` recognises the step and works out, on the host and from arrays only, what
changed since the last one: which row of the last batch each request was (when requests
left) and the page-table rows to write again (the rows that start a page, and rows whose list
changed otherwise, e.g. a prefix cache swapping a page for an identical one). The batch
carries them (`ForwardBatch.previous`, `previous_rows`, `page_updates`) inside the one upload
the model runner makes anyway, so a backend can update its device tensors in place (the
`triton` backend does). Every other field of the batch is built as on any step: plugins read
the same `ForwardBatch`.

Off unless `PEGBOARD_STEADY_DECODE=1`: on the 2-core CPU machine (`scripts/
bench_steady_decode.py`, docs/benchmarks.md) working out the continuation costs the runner
more host time (~65 µs a step at 256 requests) than the backend's in-place update saves
there; on a GPU the backend also saves its two pinned uploads, which the CPU cannot show
(`bash scripts/device-run.sh steady-decode` measures both ways on the device).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.types import ForwardBatch, Request


@dataclass
class Continuation:
    """How a steady decode step differs from the last decode batch (host arrays)."""

    previous: ForwardBatch
    rows: np.ndarray | None  # each request's row in `previous`; None: the same rows
    page_updates: np.ndarray | None  # `[k, 1 + pages]`: a row, then its pages (zero-padded)


class SteadyDecode:
    """The last decode-only batch the model runner built, with its requests' positions and
    page counts, to describe the next one relative to it when that one continues it."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.enabled = os.environ.get("PEGBOARD_STEADY_DECODE", "0") == "1"
        self.batch: ForwardBatch | None = None
        self.starts = np.zeros(0, dtype=np.int64)  # the batch's positions
        self.num_pages = np.zeros(0, dtype=np.int64)  # the pages each of its requests covers
        self._rows: dict[int, int] | None = None  # id(request) -> its row, built when needed
        self._arange = torch.zeros(0, dtype=torch.int64)

    def reset(self) -> None:
        """The runner built a batch that is not decode-only: nothing continues from here."""
        self.batch = None

    def follow(
        self,
        requests: list[Request],
        starts: np.ndarray,
        num_pages: np.ndarray,
        table: np.ndarray,
        changed: list[int],
    ) -> Continuation | None:
        """The continuation of the last batch by a decode step over `requests` at positions
        `starts`, covering `num_pages` pages of `table` (their page tables; `changed`: rows
        whose list changed since the last step); None when it does not continue it."""
        last = self.batch
        if last is None or not self.enabled:
            return None
        rows = None
        if requests != last.requests:
            if self._rows is None:
                self._rows = {id(r): i for i, r in enumerate(last.requests)}
            found = list(map(self._rows.get, map(id, requests)))
            if None in found:  # a request joined (or came back)
                return None
            rows = np.asarray(found, dtype=np.int64)
        before = self.starts if rows is None else self.starts[rows]
        if ((starts - before) != 1).any():
            return None
        grown = num_pages != (self.num_pages if rows is None else self.num_pages[rows])
        grown[changed] = True  # a changed row may differ anywhere: the whole row
        update = np.flatnonzero(grown)
        if not update.size:
            return Continuation(last, rows, None)
        return Continuation(last, rows, np.column_stack([update, table[update]]))

    def record(self, batch: ForwardBatch, starts: np.ndarray, num_pages: np.ndarray) -> None:
        """`batch`, decode-only, was built: the next step may continue it."""
        if self.batch is not None:
            self.batch.previous = None  # prepared already: no chain of every step's batch
        self.batch, self.starts, self.num_pages = batch, starts, num_pages
        self._rows = None

    def arange(self, n: int) -> torch.Tensor:
        """0 ... n - 1 on the device (a decode batch's logits rows), uploaded once."""
        if self._arange.shape[0] < n:
            self._arange = to_device(np.arange(max(n, 64), dtype=np.int64), self.device)
        return self._arange[:n]
