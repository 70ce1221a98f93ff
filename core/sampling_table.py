"""Each live request's sampling parameters in a slot of a few arrays, written once on arrival.

The sampler used to read `request.params` field by field for every request whenever its batch
changed (a request finished or arrived: every few decode steps at 256 requests). The engine
instead `add`s a request here when it arrives and `remove`s it when it is released; each
`sample` call gets its rows as a `pegboard.sdk.sampling.SamplingBatch`, gathered by one numpy
index on the host and, when the sampler asks, by one index upload and one `index_select` from a
device copy of the table (copied again only after new requests arrived).
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.sampling import COLUMNS, SamplingBatch, row_of
from pegboard.sdk.types import Request


class SamplingTable:
    """Slots of `COLUMNS` values, seeds and arrival numbers, one per live request."""

    def __init__(self, capacity: int = 256) -> None:
        self.values = np.zeros((capacity, len(COLUMNS)), dtype=np.float64)
        self.seeds = np.zeros(capacity, dtype=np.uint64)
        self.seqs = np.zeros(capacity, dtype=np.int64)
        self._slots: dict[int, int] = {}  # id(request) -> its slot
        self._free = list(range(capacity - 1, -1, -1))
        self._device: torch.Tensor | None = None  # `values` on the device, None: stale
        self._removed = 0  # slots freed so far: a batch made before a free gathers no more

    def __len__(self) -> int:
        return len(self._slots)

    def add(self, request: Request) -> None:
        """Give `request` a slot holding its parameters (they do not change afterwards)."""
        if id(request) in self._slots:
            return
        if not self._free:
            self._grow()
        slot = self._slots[id(request)] = self._free.pop()
        values, seed = row_of(request)
        self.values[slot] = values
        self.seeds[slot] = seed
        self.seqs[slot] = request.seq
        self._device = None

    def remove(self, request: Request) -> None:
        """Free the request's slot (it was released)."""
        slot = self._slots.pop(id(request), None)
        if slot is not None:
            self._free.append(slot)
            self._removed += 1

    def batch(self, requests: list[Request]) -> SamplingBatch:
        """The rows of `requests`, in order; read from the requests' params for any of them
        that holds no slot (a caller that builds requests itself)."""
        slots = list(map(self._slots.get, map(id, requests)))
        if None in slots:
            return SamplingBatch.of(requests)
        index = np.array(slots, dtype=np.int64)
        gather = functools.partial(self._gather, index, self._removed)
        return SamplingBatch(self.values[index], self.seeds[index], self.seqs[index], gather)

    def _gather(self, index: np.ndarray, removed: int, device: torch.device) -> torch.Tensor | None:
        """The rows at `index` from the device copy; None if a slot was freed since the batch
        was made (a slot may hold another request now: the batch uses its host rows)."""
        if removed != self._removed:
            return None
        return self._on_device(device).index_select(0, to_device(index, device))

    def _on_device(self, device: torch.device) -> torch.Tensor:
        if self._device is None or self._device.device != device:
            self._device = to_device(self.values, device)
        return self._device

    def _grow(self) -> None:
        n = self.values.shape[0]
        self.values = np.concatenate([self.values, np.zeros_like(self.values)])
        self.seeds = np.concatenate([self.seeds, np.zeros_like(self.seeds)])
        self.seqs = np.concatenate([self.seqs, np.zeros_like(self.seqs)])
        self._free = list(range(2 * n - 1, n - 1, -1))
        self._device = None
