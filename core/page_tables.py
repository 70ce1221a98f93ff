"""The scheduled requests' page tables as one padded int32 array, kept up to date incrementally.

An attention backend needs the step's page tables as a `[requests, max pages]` array. Building
it from the requests' Python lists each step walks every page of every request (~30,000 ints at
256 requests: about a millisecond of host time per step). `PageTableMirror` keeps one row per
live request and rewrites a row only when that request's list changed (grown by a page every
`page_size` decode steps, reset by preemption, or edited in place by a prefix cache that swaps
a page for an identical cached one); a step then gathers its rows with one numpy index.
"""

from __future__ import annotations

import itertools
import operator

import numpy as np
from pegboard.sdk.types import Request


class PageTableMirror:
    """Rows of page ids, one per request seen by `gather` and not yet `forget`-ten.

    A step finds its rows and the rows whose request's list changed in whole-list C calls
    (dict lookups by id, a list comparison per request against the copy mirrored); only the
    changed rows (a page added every `page_size` decode steps) are rewritten in Python. A row
    holds zeros past its request's pages, so a gather zeroes only rows cut short by `num_pages`."""

    def __init__(self, rows: int = 64, width: int = 64) -> None:
        self.table = np.zeros((max(rows, 1), max(width, 1)), dtype=np.int32)
        self._rows: dict[int, int] = {}  # id(request) -> its row
        self._mirrored: list[list[int] | None] = [None] * self.table.shape[0]  # row -> pages
        self._free = list(range(self.table.shape[0] - 1, -1, -1))
        #: The last batch (a copy), its rows and the pages mirrored for each, in its order.
        self._batch: list[Request] = []
        self._batch_rows = np.zeros(0, dtype=np.intp)
        self._batch_mirrored: list[list[int] | None] = []
        #: The positions in the last `gather`'s batch of the requests whose list had changed
        #: since they were last gathered (rewritten then).
        self.changed: list[int] = []

    def gather(self, requests: list[Request], num_pages, held=None) -> np.ndarray:
        """int32 `[len(requests), max(num_pages)]`: the first `num_pages[i]` pages of each
        request's `page_table`, then zeros (a new array). `num_pages`: a list or an array;
        `held`, with an array: the length of each `page_table`, if the caller has it."""
        if requests == self._batch:  # as last time (decode): its rows, found already
            rows, mirrored = self._batch_rows, self._batch_mirrored
        else:
            rows = list(map(self._rows.get, map(id, requests)))
            if None in rows:  # requests seen for the first time
                rows = [self._new_row(r) if i is None else i for r, i in zip(requests, rows)]
            mirrored = list(map(self._mirrored.__getitem__, rows))
            self._batch, self._batch_rows = list(requests), np.asarray(rows, dtype=np.intp)
            self._batch_mirrored = mirrored
        pages = [r.page_table for r in requests]
        self.changed = list(
            itertools.compress(range(len(pages)), map(operator.ne, pages, mirrored))
        )
        for i in self.changed:
            mirrored[i] = self._write(int(rows[i]), pages[i], mirrored[i])
        if isinstance(num_pages, np.ndarray):
            width = int(num_pages.max()) if len(num_pages) else 0
            if held is None:
                held = np.fromiter(map(len, pages), np.int64, len(pages))
            cut = np.flatnonzero(held > num_pages)
        else:  # (a list of a few requests: builtins beat numpy's call cost)
            width = max(num_pages, default=0)
            cut = [i for i, (p, k) in enumerate(zip(pages, num_pages)) if len(p) > k]
        out = self.table[self._batch_rows, :width]
        for i in cut:  # rows past their `num_pages` (rare: decode covers every page held)
            out[i, num_pages[i] :] = 0
        return out

    def forget(self, request: Request) -> None:
        """Free the request's row (it was released)."""
        row = self._rows.pop(id(request), None)
        if row is not None:
            self.table[row, : len(self._mirrored[row] or ())] = 0  # a free row is all zeros
            self._mirrored[row] = None
            self._free.append(row)
            self._batch = []  # its row may go to another request

    def _write(self, row: int, pages: list[int], old: list[int] | None) -> list[int]:
        """Mirror `pages` into `row`, which holds `old` (only what follows `old`, when the list
        only grew); return the copy now mirrored."""
        start = len(old) if old and len(old) <= len(pages) and pages[: len(old)] == old else 0
        if len(pages) > self.table.shape[1]:
            self._grow(self.table.shape[0], max(len(pages), 2 * self.table.shape[1]))
        self.table[row, start : len(pages)] = pages[start:]
        if old and len(old) > len(pages):
            self.table[row, len(pages) : len(old)] = 0  # zeros past the pages (`gather`)
        copy = self._mirrored[row] = list(pages)
        return copy

    def _new_row(self, request: Request) -> int:
        if not self._free:
            n = self.table.shape[0]
            self._grow(2 * n, self.table.shape[1])
            self._free = list(range(2 * n - 1, n - 1, -1))
        row = self._rows[id(request)] = self._free.pop()
        return row

    def _grow(self, rows: int, width: int) -> None:
        table = np.zeros((rows, width), dtype=np.int32)
        old_rows, old_width = self.table.shape
        table[:old_rows, :old_width] = self.table
        self.table = table
        self._mirrored.extend([None] * (rows - old_rows))
