"""CUDA graphs for decode steps: capture the model once per batch-size bucket, then replay.

A decode step of a small batch is bound by the host launching kernels one by one (docs/
benchmarks.md: ~37 ms/token for Llama-3.1-8B at batch 1, of which ~6 ms is GPU work). A CUDA
graph records the model's forward (embedding, every layer, final norm) once and replays it
with one launch; the LM head then runs eagerly on the real rows only. A graph fixes the
addresses and shapes of everything it touches, so:

- the batch is padded up to the next captured size (`capture_sizes`, `padded_size`);
- the token ids, positions and KV slots are copied into static tensors the graph reads;
  padded rows get slot -1, which the attention backend's store skips, so they write no KV, and
  every operation is row-wise, so they never touch a real row's output;
- the attention backend keeps its per-step metadata in tensors whose addresses never change
  (`AttentionBackend.prepare_for_capture`), refilled by its ordinary `prepare` before replay.

Only decode-only batches (one new token per request) of at most the largest captured size
replay; everything else runs eagerly. All sizes share one memory pool, captured largest first
so smaller graphs reuse its blocks.
"""

from __future__ import annotations

import bisect
import logging

import torch
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, Request

log = logging.getLogger("pegboard.cuda_graph")


def capture_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes graphs are captured for: 1, 2, 4, 8, then every multiple of 8, up to and
    always including `max_batch_size` (empty for 0)."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += range(8, max_batch_size, 8)
    return sizes + [max_batch_size] if max_batch_size >= 1 else []


def padded_size(num_requests: int, sizes: list[int]) -> int | None:
    """The smallest of `sizes` (ascending) that holds `num_requests`, or None if none does."""
    i = bisect.bisect_left(sizes, num_requests)
    return sizes[i] if i < len(sizes) else None


def graph_unsupported_reason(device: torch.device, backend: AttentionBackend) -> str | None:
    """Why decode graphs cannot run with this device and backend, or None if they can."""
    if device.type != "cuda":
        return f"the model is on {device.type}, CUDA graphs need a CUDA device"
    if not backend.supports_cuda_graph:
        return f"the attention backend {type(backend).__name__} does not support CUDA graphs"
    return None


class CUDAGraphRunner:
    """Decode graphs of one model with one attention backend, for each of `sizes`.

    Built (and captured) when the runner binds an attention backend; a new backend or KV pool
    means a new `CUDAGraphRunner`. `max_requests` bounds every batch the backend will be
    prepared for (graphs or not), so the backend can size its metadata once for all of them.
    `num_replays` counts replayed steps.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        attention: AttentionBackend,
        sizes: list[int],
        max_requests: int,
        max_model_len: int,
        page_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.attention = attention
        self.sizes = sizes
        self.max_batch_size = sizes[-1]
        self.num_replays = 0
        n = self.max_batch_size
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        self.hidden: torch.Tensor | None = None  # the graphs' output, [max size, hidden]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        attention.prepare_for_capture(max(max_requests, n))
        self._capture_all(max_model_len, page_size)

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether `batch` replays a graph: decode-only and no larger than the largest size."""
        return batch.num_requests <= self.max_batch_size and batch.is_decode_only

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Run `batch` (already `prepare`d by the attention backend) through the graph of its
        padded size; the final hidden states `[num_requests, hidden]`, valid until the next
        replay."""
        n = batch.num_requests
        size = padded_size(n, self.sizes)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)  # padded rows store no KV
        self.graphs[size].replay()
        self.num_replays += 1
        return self.hidden[:n]

    @torch.inference_mode()
    def _capture_all(self, max_model_len: int, page_size: int) -> None:
        pages = -(-max_model_len // page_size)
        for size in reversed(self.sizes):
            # The longest context makes the backend pick its decode plan (split count) for
            # the longest requests; shorter ones replay the same plan with idle splits.
            batch = ForwardBatch(
                requests=[Request([0], request_id=f"cuda-graph-{i}") for i in range(size)],
                input_ids=self.input_ids[:size],
                positions=self.positions[:size],
                slot_mapping=self.slot_mapping[:size],
                query_lens_cpu=[1] * size,
                seq_lens_cpu=[max_model_len] * size,
                page_tables_cpu=[[0] * pages] * size,
                logits_indices=torch.arange(size, device=self.input_ids.device),
                samples=[True] * size,
            )
            self.attention.prepare(batch)
            out = self._run(size)  # warm up: compiles kernels, picks GEMM algorithms uncaptured
            if self.hidden is None:
                self.hidden = torch.empty_like(out)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                self.hidden[:size].copy_(self._run(size))
            self.graphs[size] = graph
        torch.cuda.synchronize()
        log.info("captured decode CUDA graphs for batch sizes %s", self.sizes)

    def _run(self, size: int) -> torch.Tensor:
        return self.model(self.input_ids[:size], self.positions[:size], self.attention)
