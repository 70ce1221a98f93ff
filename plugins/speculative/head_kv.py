"""A draft head's own paged KV (`eagle`): one layer in a private pool, a page table per request,
and the `ForwardBatch` of one head step over every drafting request at once.

A request's head entries are numbered in the order they were written (`HeadSlot.real` of them
stand for target positions; the drafts of the current step follow and are overwritten by the
next step's real entries). Entry `i` lives at slot `page_table[i // page_size] * page_size +
i % page_size`; its rotary position is given separately (a tree's nodes share positions by
depth). The attention backend is an ordinary `AttentionBackend` (the target's kind: Triton on
CUDA, torch elsewhere), so a head step over many requests is one batched attention call.
"""

from __future__ import annotations

import numpy as np
import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo


class HeadSlot:
    """One request's head KV: its pages, the real entries written, the next target position
    whose (feature, token) pair the head has not seen."""

    def __init__(self) -> None:
        self.page_table: list[int] = []
        self.real = 0
        self.next_position = 0


class HeadKV:
    """The head's pool and its free pages (see the module docstring)."""

    def __init__(self, info: ModelInfo, num_tokens: int, page_size: int, attention: str) -> None:
        self.page_size = page_size
        num_pages = -(-num_tokens // page_size)
        self.pool = KVPool.allocate(info, num_pages, page_size)
        self.attention = attention_backend(attention, info, self.pool)
        self.device = info.device
        self._free = list(range(num_pages - 1, -1, -1))

    @property
    def num_free_pages(self) -> int:
        return len(self._free)

    def reserve(self, slot: HeadSlot, entries: int) -> bool:
        """Give `slot` pages for `entries` entries in all; False (nothing taken) if the pool
        has too few free pages."""
        need = -(-entries // self.page_size) - len(slot.page_table)
        if need > len(self._free):
            return False
        for _ in range(max(need, 0)):
            slot.page_table.append(self._free.pop())
        return True

    def release(self, slot: HeadSlot) -> None:
        self._free.extend(reversed(slot.page_table))
        slot.page_table = []
        slot.real = slot.next_position = 0

    def batch(
        self,
        rows: list[tuple[HeadSlot, int, int]],
        positions: list[int] | np.ndarray,
        ids: torch.Tensor,
        tree_masks: list[torch.Tensor | None] | None = None,
    ) -> ForwardBatch:
        """A head step writing, per `(slot, first entry, count)` of `rows`, `count` entries from
        `first` on (rows' tokens concatenated in that order), at rotary `positions`; prepared
        for the head's attention backend. `ids` are the rows' input tokens (on the device)."""
        ps = self.page_size
        slots, query_lens, seq_lens, tables = [], [], [], []
        for slot, first, count in rows:
            table = np.asarray(slot.page_table, dtype=np.int64)
            index = np.arange(first, first + count)
            slots.append(table[index // ps] * ps + index % ps)
            query_lens.append(count)
            seq_lens.append(first + count)
            tables.append(slot.page_table[: -(-(first + count) // ps)])
        flat = to_device(np.concatenate([np.asarray(positions, np.int64), *slots]), self.device)
        n = len(positions)
        batch = ForwardBatch(
            requests=[],
            input_ids=ids,
            positions=flat[:n],
            slot_mapping=flat[n:],
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            page_tables_cpu=tables,
            logits_indices=flat[:0],
            samples=[True] * len(rows),
            tree_masks=tree_masks,
        )
        self.attention.prepare(batch)
        return batch


def attention_backend(name: str, info: ModelInfo, pool: KVPool):
    """A speculator's own attention backend over its pool: `triton`, `torch`, or `auto`
    (Triton on CUDA, torch elsewhere)."""
    if name == "auto":
        name = "triton" if info.device.type == "cuda" else "torch"
    if name == "triton":
        from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend(info, pool)
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend

    return TorchAttentionBackend(info, pool)
