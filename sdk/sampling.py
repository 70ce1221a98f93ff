"""`SamplingBatch`: the sampling parameters of one `sample` call's rows as arrays.

A sampler needs each row's temperature, filters, penalties, seed and logprobs count. Reading
them from `request.params` costs a Python pass over the batch (a few hundred attribute reads
at 256 requests) every time the batch changes. The core keeps them instead in per-request
slot tables, written once when a request arrives (`pegboard.core.sampling_table`), and hands
the sampler the batch's rows gathered by one index: a host array for the decisions a sampler
takes on the host (which path, which rows want logprobs) and, on first use, the same rows on
the device from a device copy of the table (one index upload, one gather).

The engine passes the batch to `sample` as the `sampling` attribute of its `requests`
argument, a `SampleRequests` (a list, so every sampler written for a plain list still works).
`SamplingBatch.of(requests)` builds the same arrays from the requests themselves, for a caller
without the core's tables (a test, the conformance kit).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.types import Request

#: The columns of `SamplingBatch.values`, in order (float64: exact for every integer field).
COLUMNS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "frequency_penalty",
    "presence_penalty",
    "logprobs",  # the number of top alternatives; -1: no logprobs
    "seeded",  # 1.0 when `params.seed` is set (then `seeds` holds it), else 0.0
)
COLUMN = {name: i for i, name in enumerate(COLUMNS)}


def row_of(request: Request) -> tuple[list[float], int]:
    """A request's row of `COLUMNS` and its seed modulo 2**64 (0 when unseeded)."""
    p = request.params
    values = [
        p.temperature,
        p.top_k,
        p.top_p,
        p.min_p,
        p.repetition_penalty,
        p.frequency_penalty,
        p.presence_penalty,
        -1 if p.logprobs is None else p.logprobs,
        0.0 if p.seed is None else 1.0,
    ]
    return values, 0 if p.seed is None else p.seed % 2**64


class SamplingBatch:
    """Row `i` holds `requests[i]`'s sampling parameters (`requests.sampling` in `sample`).

    - `values`: float64 `[rows, len(COLUMNS)]` on the host; `column(name)` is one column.
    - `seeds`: uint64 `[rows]`, `params.seed % 2**64` of seeded rows (0 for the others);
      `seqs`: int64 `[rows]`, the requests' arrival numbers (`request.seq`).
    - `on_device(device)`: `values` as a float64 tensor on `device`, made on first use.
    """

    def __init__(
        self,
        values: np.ndarray,
        seeds: np.ndarray,
        seqs: np.ndarray,
        gather: Callable[[torch.device], torch.Tensor | None] | None = None,
    ) -> None:
        self.values, self.seeds, self.seqs = values, seeds, seqs
        self._gather = gather  # the core's: these rows from its device table (None: stale)
        self._device: torch.Tensor | None = None

    @classmethod
    def of(cls, requests: list[Request]) -> SamplingBatch:
        """The batch's arrays read from `requests[i].params` (no core tables)."""
        rows = [row_of(r) for r in requests]
        values = np.array([v for v, _ in rows], dtype=np.float64).reshape(-1, len(COLUMNS))
        seeds = np.array([s for _, s in rows], dtype=np.uint64)
        seqs = np.array([r.seq for r in requests], dtype=np.int64)
        return cls(values, seeds, seqs)

    def __len__(self) -> int:
        return self.values.shape[0]

    def take(self, rows: list[int]) -> SamplingBatch:
        """The batch of these rows only, in this order."""
        index = np.asarray(rows, dtype=np.int64)
        return SamplingBatch(self.values[index], self.seeds[index], self.seqs[index])

    def column(self, name: str) -> np.ndarray:
        """One of `COLUMNS`, float64 `[rows]` (a view)."""
        return self.values[:, COLUMN[name]]

    def on_device(self, device: torch.device) -> torch.Tensor:
        """`values` on `device` (float64 `[rows, len(COLUMNS)]`), gathered there once."""
        if self._device is None or self._device.device != device:
            gathered = self._gather(device) if self._gather is not None else None
            if gathered is None:  # no core table, or it changed since: the host rows
                gathered = to_device(self.values, device)
            self._device = gathered
        return self._device


class SampleRequests(list):
    """The `requests` of one `sample` call: a list of `Request`, plus their parameters as a
    `SamplingBatch` in `sampling` (built on first access by `build`)."""

    def __init__(self, requests: list[Request], build: Callable[[], SamplingBatch]) -> None:
        super().__init__(requests)
        self._build = build
        self._sampling: SamplingBatch | None = None

    @property
    def sampling(self) -> SamplingBatch:
        if self._sampling is None:
            self._sampling = self._build()
        return self._sampling


def sampling_of(requests: list[Request]) -> SamplingBatch:
    """`requests.sampling` when the engine passed it, else the arrays read from the requests."""
    sampling = getattr(requests, "sampling", None)
    return sampling if isinstance(sampling, SamplingBatch) else SamplingBatch.of(requests)
