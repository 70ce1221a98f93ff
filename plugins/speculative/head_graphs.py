"""CUDA graphs of an EAGLE head's draft chain: draft steps 1 .. k-1 of up to B requests in one
replay (the first draft comes from the eager catch-up forward over each request's new pairs).

Each draft step is a decode batch over the head's pool: one token per request at entry
`real + d - 1`, rotary position `last position + d`. Step `d` gets its own attention backend
(`head_kv.attention_backend`, Triton), whose metadata tensors keep their addresses
(`prepare_for_capture`): before a replay the host prepares every step's backend for the real
batch (sequence lengths, page tables) and writes the steps' positions and KV slots into static
buffers; inside the graph each step feeds on the previous step's output and argmax, so draft
ids never leave the device until the chain is done. Batches are padded to a captured size
(`pegboard.core.cuda_graph.capture_sizes`): padded rows have slot -1 and sequence length 0.
"""

from __future__ import annotations

import logging

import torch
from pegboard.core.cuda_graph import capture_sizes, padded_size
from pegboard.plugins.speculative.head_kv import HeadKV, HeadSlot, attention_backend
from pegboard.sdk.device import to_device
from pegboard.sdk.types import ForwardBatch

log = logging.getLogger("pegboard.speculative.eagle")


class ChainGraphs:
    """Draft steps 1 .. `k` - 1 of an EAGLE head chain as one CUDA graph per batch size."""

    def __init__(self, head, kv: HeadKV, k: int, max_batch_size: int, features: int) -> None:
        self.head, self.kv, self.k = head, kv, k
        self.sizes = capture_sizes(max_batch_size)
        n, dev = self.sizes[-1], kv.device
        info = kv.attention.model
        self.backends = [attention_backend("triton", info, kv.pool) for _ in range(k - 1)]
        for b in self.backends:
            b.prepare_for_capture(n)
        self.last = torch.zeros(n, features, dtype=info.dtype, device=dev)
        self.tokens = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(k - 1, n, dtype=torch.int64, device=dev)
        self.slots = torch.full((k - 1, n), -1, dtype=torch.int64, device=dev)
        self.drafts = torch.zeros(n, k - 1, dtype=torch.int64, device=dev)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.num_replays = 0
        self._capture_all(info.max_model_len)

    def can_run(self, num_requests: int) -> bool:
        return num_requests <= self.sizes[-1]

    def run(self, slots: list[HeadSlot], positions: list[int], last, tokens) -> torch.Tensor:
        """Drafts 2 .. k `[len(slots), k - 1]` (device) after the first draft `tokens` `[B]`
        predicted from `last` `[B, hidden]`, for requests whose last real entry has rotary
        position `positions[i]`."""
        n = len(slots)
        size = padded_size(n, self.sizes)
        ps = self.kv.page_size
        host_pos, host_slots = [], []
        for d in range(1, self.k):
            host_pos.append([p + d for p in positions] + [0] * (size - n))
            row = []
            for s in slots:
                i = s.real + d - 1
                row.append(s.page_table[i // ps] * ps + i % ps)
            host_slots.append(row + [-1] * (size - n))
            self.backends[d - 1].prepare(_decode_batch(slots, d, self.slots[d - 1, :size], ps))
        flat = to_device([host_pos, host_slots], self.kv.device, torch.int64)
        self.positions[:, :size].copy_(flat[0])
        self.slots[:, :size].copy_(flat[1])
        self.last[:n].copy_(last)
        self.tokens[:n].copy_(tokens)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.drafts[:n]

    @torch.inference_mode()
    def _capture_all(self, max_model_len: int) -> None:
        pages = -(-max_model_len // self.kv.page_size)
        self.pool = torch.cuda.graph_pool_handle() if self.last.is_cuda else None
        for size in reversed(self.sizes):
            for d, backend in enumerate(self.backends):
                backend.prepare(
                    ForwardBatch(
                        requests=[],
                        input_ids=self.tokens[:size],
                        positions=self.positions[d, :size],
                        slot_mapping=self.slots[d, :size],
                        query_lens_cpu=[1] * size,
                        seq_lens_cpu=[max_model_len] * size,
                        page_tables_cpu=[[0] * pages] * size,
                        logits_indices=self.tokens[:0],
                        samples=[True] * size,
                    )
                )
            self.graphs[size] = self._capture(size)
        if self.last.is_cuda:
            torch.cuda.synchronize()
        log.info("captured EAGLE draft-chain CUDA graphs (%d steps) for %s", self.k - 1, self.sizes)

    def _capture(self, size: int):
        self._steps(size)  # warm up: compiles kernels uncaptured
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._steps(size)
        return graph

    def _steps(self, size: int) -> None:
        last, tokens = self.last[:size], self.tokens[:size]
        for d, backend in enumerate(self.backends):
            last = self.head.step(last, tokens, self.positions[d, :size], backend, first=False)
            tokens = self.head.draft_ids(last)
            self.drafts[:size, d].copy_(tokens)


def _decode_batch(slots: list[HeadSlot], d: int, slot_mapping, page_size: int) -> ForwardBatch:
    """Draft step `d`'s batch for the attention backend: one entry per request at
    `real + d - 1` (the graph's static `slot_mapping`, padded rows after the real ones)."""
    seq_lens = [s.real + d for s in slots]
    return ForwardBatch(
        requests=[],
        input_ids=slot_mapping,
        positions=slot_mapping,
        slot_mapping=slot_mapping,
        query_lens_cpu=[1] * len(slots),
        seq_lens_cpu=seq_lens,
        page_tables_cpu=[s.page_table[: -(-n // page_size)] for s, n in zip(slots, seq_lens)],
        logits_indices=slot_mapping[:0],
        samples=[True] * len(slots),
    )
