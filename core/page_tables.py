"""The scheduled requests' page tables as one padded int32 array, kept up to date incrementally.

An attention backend needs the step's page tables as a `[requests, max pages]` array. Building
it from the requests' Python lists each step walks every page of every request (~30,000 ints at
256 requests: about a millisecond of host time per step). `PageTableMirror` keeps one row per
live request and rewrites a row only when that request's list changed (grown by a page every
`page_size` decode steps, reset by preemption, or edited in place by a prefix cache that swaps
a page for an identical cached one); a step then gathers its rows with one numpy index.
"""

from __future__ import annotations

import numpy as np
from pegboard.sdk.types import Request


class PageTableMirror:
    """Rows of page ids, one per request seen by `gather` and not yet `forget`-ten."""

    def __init__(self, rows: int = 64, width: int = 64) -> None:
        self.table = np.zeros((max(rows, 1), max(width, 1)), dtype=np.int32)
        self._rows: dict[int, tuple[int, list[int]]] = {}  # id(request) -> row, pages mirrored
        self._free = list(range(self.table.shape[0] - 1, -1, -1))

    def gather(self, requests: list[Request], num_pages) -> np.ndarray:
        """int32 `[len(requests), max(num_pages)]`: the first `num_pages[i]` pages of each
        request's `page_table`, then zeros (a new array). `num_pages`: a list or an array."""
        rows = [self._row(r) for r in requests]
        lengths = np.asarray(num_pages, dtype=np.int32)
        width = int(lengths.max()) if len(lengths) else 0
        out = self.table[rows, :width]
        if int(lengths.min(initial=width)) < width:
            out[np.arange(width, dtype=np.int32) >= lengths[:, None]] = 0
        return out

    def forget(self, request: Request) -> None:
        """Free the request's row (it was released)."""
        entry = self._rows.pop(id(request), None)
        if entry is not None:
            self._free.append(entry[0])

    def _row(self, r: Request) -> int:
        pages = r.page_table
        entry = self._rows.get(id(r))
        if entry is not None and entry[1] == pages:
            return entry[0]
        if entry is None:
            row, start = self._new_row(), 0
        else:
            row, old = entry
            start = len(old) if len(old) <= len(pages) and pages[: len(old)] == old else 0
        if len(pages) > self.table.shape[1]:
            self._grow(self.table.shape[0], max(len(pages), 2 * self.table.shape[1]))
        self.table[row, start : len(pages)] = pages[start:]
        self._rows[id(r)] = (row, list(pages))
        return row

    def _new_row(self) -> int:
        if not self._free:
            n = self.table.shape[0]
            self._grow(2 * n, self.table.shape[1])
            self._free = list(range(2 * n - 1, n - 1, -1))
        return self._free.pop()

    def _grow(self, rows: int, width: int) -> None:
        table = np.zeros((rows, width), dtype=np.int32)
        old_rows, old_width = self.table.shape
        table[:old_rows, :old_width] = self.table
        self.table = table
