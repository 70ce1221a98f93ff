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
the head's pool, whose metadata tensors keep their addresses (`prepare_for_capture`). Before a
replay the host makes one upload of every static input (ids, positions and KV slots of the
catch-up rows, and each draft step's positions, slots and sequence lengths) and prepares the
catch-up forward's backend (while the batch size and page tables stay, two device copies);
each draft step's backend gets its metadata inside the graph
(`TritonAttentionBackend.decode_on_device`: the catch-up's page tables, its sequence lengths
from the upload), so the host prepares one backend per replay, not k. Batches are padded to a
captured size (`pegboard.core.cuda_graph.capture_sizes`): padded requests store nothing.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from pegboard.core.cuda_graph import capture_graph, capture_sizes, padded_size
from pegboard.plugins.speculative.head_kv import HeadKV, attention_backend
from pegboard.sdk.device import upload
from pegboard.sdk.types import ForwardBatch

log = logging.getLogger("pegboard.speculative.eagle")


class Feed:
    """The catch-up forward of a tree drafting graph (`head_tree_graphs`): static inputs of up
    to `max_batch_size` requests of `q` rows each and its own attention backend over the
    head's pool."""

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


class _Inputs:
    """The static inputs of one batch size's graph: views into `DraftGraphs.inputs`, laid out
    as `host_inputs` writes them (`length` int64 values from offset 0)."""

    def __init__(self, buffer: torch.Tensor, size: int, q: int, k: int) -> None:
        rows, steps = size * q, (k - 1, size)
        parts = [rows, rows, rows, size, *[(k - 1) * size] * 3, size, size]
        self.length = sum(parts)
        views = buffer[: self.length].split(parts)
        self.ids, self.positions, self.slots, self.last_rows = views[:4]
        self.step_positions, self.step_slots, self.step_seq_lens = (
            v.view(steps) for v in views[4:7]
        )
        self.seq_lens, self.prefix_lens = views[7:]  # the catch-up's, per request


class DraftGraphs:
    """A head's chain `propose` (catch-up forward + `k - 1` draft steps) per batch size.

    A replay's host work: one upload of every static input (`host_inputs`), the features'
    copy and the catch-up forward's `prepare`, which only copies the uploaded lengths on the
    device while the batch size and page tables stay as last prepared (most steps:
    `TritonAttentionBackend.extend_on_device`); each draft step's attention metadata is
    written inside the graph (`decode_on_device`: the catch-up's page tables, sequence
    lengths from the upload), not prepared on the host."""

    def __init__(self, head, kv: HeadKV, k: int, max_batch_size: int, feature_size: int) -> None:
        self.head, self.kv, self.k, self.q = head, kv, k, k + 1
        self.sizes = capture_sizes(max_batch_size)
        self.max_batch_size = n = self.sizes[-1]
        dev = kv.device
        info = kv.attention.model
        self.max_model_len = info.max_model_len
        self.catch_up = attention_backend("triton", info, kv.pool)  # the catch-up forward's
        self.catch_up.prepare_for_capture(n, max_query_len=self.q)
        self.feats = torch.zeros(n * self.q, feature_size, dtype=info.dtype, device=dev)
        self.backends = [attention_backend("triton", info, kv.pool) for _ in range(k - 1)]
        for b in self.backends:
            b.prepare_for_capture(n)
        rows = n * self.q  # (the layout's longest: `_Inputs` of n, then the features' rows)
        self.inputs = torch.zeros(4 * rows + 3 * n + 3 * (k - 1) * n, dtype=torch.int64, device=dev)
        self.views = {size: _Inputs(self.inputs, size, self.q, k) for size in self.sizes}
        self.drafts = torch.zeros(n, k, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        self._prepared: tuple[int, list] | None = None  # the catch-up's (size, page tables)
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
        n = len(jobs)
        size = padded_size(n, self.sizes)
        views = self.views[size]
        host = self.host_inputs(jobs, size)
        host = torch.from_numpy(np.fromiter(host, np.int64, len(host)))  # (torch.tensor: ~3x)
        upload(host, self.inputs[: host.shape[0]])
        if n == 1:  # its rows come first
            feats = jobs[0].feats
            self.feats[: feats.shape[0]].copy_(feats)
        else:  # (their rows went up after the static inputs)
            dest = self.inputs[views.length : host.shape[0]]
            self.feats.index_copy_(0, dest, torch.cat([j.feats for j in jobs]))
        tables = [j.slot.page_table for j in jobs]
        if self._prepared == (size, tables):  # (lists compared in C: no array per step)
            self.catch_up.extend_on_device(views.seq_lens, views.prefix_lens)
        else:  # the catch-up's layout: `size` requests of `q` new rows, each job's whole page
            # table (the draft steps read their pages from here); padded ones over page 0
            q = self.q
            seq_lens = [j.slot.real + q for j in jobs] + [q] * (size - n)
            lists = tables + [[0]] * (size - n)
            array = _tables_array(tables, size)
            self.catch_up.prepare(_batch(views.slots, [q] * size, seq_lens, lists, array))
            self._prepared = (size, [list(t) for t in tables])  # (copies: the lists grow)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.drafts[:n]

    def host_inputs(self, jobs, size: int) -> list[int]:
        """The static inputs of `jobs` padded to `size` requests (`_Inputs`' layout), a list
        (a few dozen ints at batch 1: Python lists beat numpy's per-call cost): request `i`'s
        new pairs at rows `i * q ...` (ids, positions, KV slots; padded rows slot -1), its
        last real row, per draft step its position, KV slot and sequence length (padded
        requests: 0, -1, 0), the catch-up's sequence and prefix lengths (padded: `q`, 0); for
        more than one job, their features' rows."""
        q, k, ps, pad = self.q, self.k, self.kv.page_size, size - len(jobs)
        ids, positions, slots, last_rows, seq_lens, prefix_lens = [], [], [], [], [], []
        steps = []  # per job: its k - 1 draft steps' positions, slots, sequence lengths
        for i, j in enumerate(jobs):
            m, real, table = len(j.ids), j.slot.real, j.slot.page_table
            kv = [table[e // ps] * ps + e % ps for e in range(real, real + m + k - 1)]
            fill = [0] * (q - m)
            ids += j.ids + fill
            positions += j.positions + fill
            slots += kv[:m] + [-1] * (q - m)
            last_rows.append(i * q + m - 1)
            last = j.positions[-1]
            steps.append((range(last + 1, last + k), kv[m:], range(real + m + 1, real + m + k)))
            seq_lens.append(real + q)
            prefix_lens.append(real)
        pad_rows = [0] * (pad * q)
        out = ids + pad_rows + positions + pad_rows + slots + [-1] * (pad * q) + last_rows
        out += range(len(jobs) * q, size * q, q)
        for part, padding in ((0, 0), (1, -1), (2, 0)):  # `[k - 1, size]`: step-major
            for step in zip(*(s[part] for s in steps)):  # (draft step d: every job's value)
                out += step
                out += [padding] * pad
        out += seq_lens + [q] * pad + prefix_lens + [0] * pad
        if len(jobs) > 1:
            out += [i * q + r for i, j in enumerate(jobs) for r in range(len(j.ids))]
        return out

    @torch.inference_mode()
    def _capture_all(self) -> None:
        pages = -(-self.max_model_len // self.kv.page_size)
        self.pool = torch.cuda.graph_pool_handle() if self.drafts.is_cuda else None
        for size in reversed(self.sizes):
            full = [self.max_model_len] * size
            tables = [[0] * pages] * size
            views = self.views[size]
            self.catch_up.prepare(_batch(views.slots, [self.q] * size, full, tables))
            self._prepared = None
            for d, backend in enumerate(self.backends):  # (decode kernels, split counts)
                backend.prepare(_batch(views.step_slots[d], [1] * size, full, tables))
            self.graphs[size] = self._capture(size)
        if self.drafts.is_cuda:
            torch.cuda.synchronize()
        log.info("captured EAGLE drafting CUDA graphs (%d forwards) for %s", self.k, self.sizes)

    def _capture(self, size: int):
        return capture_graph(self._steps, size, self.pool)

    def _steps(self, size: int) -> None:
        views = self.views[size]
        rows = size * self.q
        out = self.head.step(self.feats[:rows], views.ids, views.positions, self.catch_up,
                             first=True)  # fmt: skip
        last = out[views.last_rows]  # each request's last real row
        drafts = [self.head.draft_ids(last)]
        for d, backend in enumerate(self.backends, start=1):
            backend.decode_on_device(
                self.catch_up, views.step_seq_lens[d - 1], views.step_slots[d - 1]
            )
            last = self.head.step(last, drafts[-1], views.step_positions[d - 1], backend,
                                  first=False)  # fmt: skip
            drafts.append(self.head.draft_ids(last))
        torch.stack(drafts, dim=1, out=self.drafts[:size])  # (one copy, not k)


def _tables_array(tables: list[list[int]], size: int) -> np.ndarray:
    """Page tables as the zero-padded int32 array `[size, pages]` (`page_tables_array`)."""
    out = np.zeros((size, max(map(len, tables))), np.int32)
    for i, table in enumerate(tables):
        out[i, : len(table)] = table
    return out


def _slots(slot, first: int, count: int, page_size: int) -> np.ndarray:
    """KV slots of a head slot's entries `first .. first + count - 1`."""
    table = np.asarray(slot.page_table, dtype=np.int64)
    index = np.arange(first, first + count)
    return table[index // page_size] * page_size + index % page_size


def _batch(slot_mapping, query_lens, seq_lens, tables, array=None) -> ForwardBatch:
    """What an attention backend's `prepare` reads (the graph's static slots; `array`: the
    page tables as `ForwardBatch.page_tables_array`)."""
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
        page_tables_array=array,
    )
