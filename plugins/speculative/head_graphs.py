"""CUDA graphs of an EAGLE head's chain drafting: a whole `propose` of up to B requests in one
replay, once each request has at most `k + 1` new (feature, token) pairs (every step after a
verify: the accepted drafts and the target's token; the rest of a longer backlog, after a
prefill or a pause in drafting, is fed eagerly first: `EagleSpeculator._catch_up`).

The replay runs, as the eager path does (`eagle.EagleSpeculator._feed`, `_chains`):

1. the catch-up forward: request `i`'s new pairs at rows `i * (k + 1) ...` of static buffers,
   padded at its end with rows of slot -1 (causal attention never shows them to a real row),
   its last real row's output predicting the first draft;
2. draft steps 1 .. k-1: one token per request at entry `real + d - 1`, feeding on the last
   step's output and argmax, so draft ids stay on the device until the chain is done.

Each of the k forwards has its own attention backend (`head_kv.attention_backend`, Triton) over
the head's pool, whose metadata tensors keep their addresses (`prepare_for_capture`): before a
replay the host prepares each for the real batch and writes positions, KV slots and input ids
into the static buffers. Batches are padded to a captured size
(`pegboard.core.cuda_graph.capture_sizes`): padded requests store nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pegboard.core.cuda_graph import capture_graph, capture_sizes, padded_size
from pegboard.plugins.speculative.head_kv import HeadKV, attention_backend
from pegboard.sdk.device import to_device
from pegboard.sdk.types import ForwardBatch

log = logging.getLogger("pegboard.speculative.eagle")


class Feed:
    """The catch-up forward of a drafting graph: static inputs of up to `max_batch_size`
    requests of `q` rows each and its own attention backend over the head's pool."""

    def __init__(self, kv: HeadKV, q: int, max_batch_size: int, feature_size: int) -> None:
        self.kv, self.q = kv, q
        info = kv.attention.model
        dev = kv.device
        self.backend = attention_backend("triton", info, kv.pool)
        self.backend.prepare_for_capture(max_batch_size, max_query_len=q)
        rows = max_batch_size * q
        self.feats = torch.zeros(rows, feature_size, dtype=info.dtype, device=dev)
        self.ids = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(rows, dtype=torch.int64, device=dev)
        self.slots = torch.full((rows,), -1, dtype=torch.int64, device=dev)
        self.last_rows = torch.arange(max_batch_size, dtype=torch.int64, device=dev) * q

    def host_inputs(self, jobs, size: int) -> tuple[list[np.ndarray], list[int]]:
        """The jobs' ids, positions, slots, last rows and row index (where their rows go) as
        host arrays for `load` (padded to `size` requests), and each job's number of pairs."""
        q, ps, n = self.q, self.kv.page_size, len(jobs)
        rows = size * q
        lens = [len(j.ids) for j in jobs]
        dest = np.concatenate([np.arange(m) + i * q for i, m in enumerate(lens)])
        ids = np.zeros(rows, np.int64)
        positions = np.zeros(rows, np.int64)
        slots = np.full(rows, -1, np.int64)
        ids[dest] = [t for j in jobs for t in j.ids]
        positions[dest] = [p for j in jobs for p in j.positions]
        slots[dest] = np.concatenate(
            [_slots(j.slot, j.slot.real, m, ps) for j, m in zip(jobs, lens)]
        )
        last_rows = np.arange(size, dtype=np.int64) * q
        last_rows[:n] += np.asarray(lens) - 1
        return [ids, positions, slots, last_rows, dest], lens

    def load(self, jobs, parts: list[torch.Tensor], lens: list[int], size: int) -> None:
        """Copy `host_inputs`' arrays (on the device now) into the static inputs and prepare
        the backend for the graph's layout: `size` requests of `q` new rows (a request's
        head entries before them unchanged; padded requests over page 0)."""
        rows, q, ps, n = size * self.q, self.q, self.kv.page_size, len(jobs)
        self.ids[:rows].copy_(parts[0])
        self.positions[:rows].copy_(parts[1])
        self.slots[:rows].copy_(parts[2])
        self.last_rows[:size].copy_(parts[3])
        self.feats.index_copy_(0, parts[4], torch.cat([j.feats for j in jobs]))
        seq_lens = [j.slot.real + q for j in jobs] + [q] * (size - n)
        tables = [j.slot.page_table[: -(-s // ps)] for j, s in zip(jobs, seq_lens)]
        self.backend.prepare(
            _batch(self.slots[:rows], [q] * size, seq_lens, tables + [[0]] * (size - n))
        )

    def prepare_capture(self, size: int, max_model_len: int, pages: int) -> None:
        rows = size * self.q
        full, tables = [max_model_len] * size, [[0] * pages] * size
        self.backend.prepare(_batch(self.slots[:rows], [self.q] * size, full, tables))

    def run(self, head, size: int) -> torch.Tensor:
        """(In the graph) the head over the static rows; each request's last real row's
        output `[size, hidden]`."""
        rows = size * self.q
        out = head.step(self.feats[:rows], self.ids[:rows], self.positions[:rows],
                        self.backend, first=True)  # fmt: skip
        return out[self.last_rows[:size]]


class DraftGraphs:
    """A head's chain `propose` (catch-up forward + `k - 1` draft steps) per batch size."""

    def __init__(self, head, kv: HeadKV, k: int, max_batch_size: int, feature_size: int) -> None:
        self.head, self.kv, self.k, self.q = head, kv, k, k + 1
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = n = self.sizes[-1]
        dev = kv.device
        info = kv.attention.model
        self.max_model_len = info.max_model_len
        self.feed = Feed(kv, self.q, n, feature_size)
        self.backends = [attention_backend("triton", info, kv.pool) for _ in range(k - 1)]
        for b in self.backends:
            b.prepare_for_capture(n)
        self.positions = torch.zeros(k - 1, n, dtype=torch.int64, device=dev)
        self.slots = torch.full((k - 1, n), -1, dtype=torch.int64, device=dev)
        self.drafts = torch.zeros(n, k, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        self._capture_all()

    def can_run(self, jobs) -> bool:
        """Whether `jobs` (`eagle._Job`s) fit a graph: few enough, each at most `k + 1` new
        pairs, and their padded entries within the page table."""
        return len(jobs) <= self.max_batch_size and all(
            len(j.ids) <= self.q and j.slot.real + self.q + self.k <= self.max_model_len
            for j in jobs
        )

    def run(self, jobs) -> torch.Tensor:
        """The `k` greedy drafts of each job, `[len(jobs), k]` on the device. The jobs' head KV
        must have room for their new pairs and `k - 1` draft entries; the caller advances
        their slots (`real`, `next_position`) as after an eager catch-up."""
        n, ps = len(jobs), self.kv.page_size
        size = padded_size(n, self.sizes)
        arrays, lens = self.feed.host_inputs(jobs, size)
        step_positions = np.zeros((self.k - 1, size), np.int64)
        step_slots = np.full((self.k - 1, size), -1, np.int64)
        for i, (j, m) in enumerate(zip(jobs, lens)):
            step_positions[:, i] = j.positions[-1] + np.arange(1, self.k)
            step_slots[:, i] = _slots(j.slot, j.slot.real + m, self.k - 1, ps)
        arrays += [step_positions.ravel(), step_slots.ravel()]
        parts = torch.split(to_device(np.concatenate(arrays), self.kv.device),
                            [len(a) for a in arrays])  # fmt: skip
        self.feed.load(jobs, parts, lens, size)
        self.positions[:, :size].copy_(parts[5].view(self.k - 1, size))
        self.slots[:, :size].copy_(parts[6].view(self.k - 1, size))
        for d, backend in enumerate(self.backends, start=1):
            seq_lens = [j.slot.real + m + d for j, m in zip(jobs, lens)]
            backend.prepare(_decode_batch(jobs, seq_lens, self.slots[d - 1, :size], ps))
        self.graphs[size].replay()
        self.num_replays += 1
        return self.drafts[:n]

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pages = -(-self.max_model_len // self.kv.page_size)
        self.pool = torch.cuda.graph_pool_handle() if self.drafts.is_cuda else None
        for size in reversed(self.sizes):
            full = [self.max_model_len] * size
            tables = [[0] * pages] * size
            self.feed.prepare_capture(size, self.max_model_len, pages)
            for d, backend in enumerate(self.backends):
                backend.prepare(_batch(self.slots[d, :size], [1] * size, full, tables))
            self.graphs[size] = self._capture(size)
        if self.drafts.is_cuda:
            torch.cuda.synchronize()
        log.info("captured EAGLE drafting CUDA graphs (%d forwards) for %s", self.k, self.sizes)

    def _capture(self, size: int):
        return capture_graph(self._steps, size, self.pool)

    def _steps(self, size: int) -> None:
        last = self.feed.run(self.head, size)
        tokens = self.head.draft_ids(last)
        self.drafts[:size, 0].copy_(tokens)
        for d, backend in enumerate(self.backends, start=1):
            last = self.head.step(last, tokens, self.positions[d - 1, :size], backend, first=False)
            tokens = self.head.draft_ids(last)
            self.drafts[:size, d].copy_(tokens)


def _slots(slot, first: int, count: int, page_size: int) -> np.ndarray:
    """KV slots of a head slot's entries `first .. first + count - 1`."""
    table = np.asarray(slot.page_table, dtype=np.int64)
    index = np.arange(first, first + count)
    return table[index // page_size] * page_size + index % page_size


def _decode_batch(jobs, seq_lens: list[int], slot_mapping, page_size: int) -> ForwardBatch:
    """A draft step's batch: one new entry per job, `seq_lens` entries in all."""
    tables = [j.slot.page_table[: -(-s // page_size)] for j, s in zip(jobs, seq_lens)]
    return _batch(slot_mapping, [1] * len(jobs), seq_lens, tables)


def _batch(slot_mapping, query_lens, seq_lens, tables) -> ForwardBatch:
    """What an attention backend's `prepare` reads (the graph's static slots)."""
    return ForwardBatch(
        requests=[],
        input_ids=slot_mapping,
        positions=slot_mapping,
        slot_mapping=slot_mapping,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        page_tables_cpu=tables,
        logits_indices=slot_mapping[:0],
        samples=[True] * len(query_lens),
    )
