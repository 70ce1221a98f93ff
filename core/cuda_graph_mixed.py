"""CUDA graphs for mixed steps: prefill (or chunked-prefill) tokens next to decodes, replayed
per token-count bucket instead of launched layer by layer.

A mixed step of a small model is bound by the host launching ~15 kernels per layer (about
1-1.5 ms per step for Qwen3-0.6B's 28 layers on the H200, docs/benchmarks.md), and under a
serving load, where requests are admitted while others decode, a large share of the steps are
mixed. The decode graphs (`pegboard.core.cuda_graph`) fix one token per request; here a graph
fixes only the number of token rows:

- the batch's tokens keep their flat order in rows `0 .. T-1` of static inputs and the rows up
  to the bucket's size (`mixed_token_sizes`, `padded_size`) are padding: slot -1, so they store
  no K/V, and they belong to no request, so attention never reads or writes them; every other
  operation is row-wise, so they never touch a real row, and the hidden states come back as
  rows `0 .. T-1` in the batch's own order;
- the attention backend (`supports_cuda_graph_mixed`) prepares the padded batch with
  `prepare_mixed`: its per-request metadata sits in the tensors fixed for the decode graphs and
  its kernels' grids depend only on the row count (the Triton backend pads its extend block map
  with blocks of no request up to the most blocks `T` tokens can need).

This is a full graph per bucket, not a piecewise one (graphs between attention calls with
attention run eagerly, as SGLang's and vLLM's piecewise modes do): a piecewise step still
launches attention per layer from Python, and needs the model cut at its attention calls; a
padded full graph needs only a backend whose launch is shape-static, which the Triton backend
already is for decode and verify graphs. docs/architecture.md says more.

Graphs are captured for every bucket up to `--cuda-graph-mixed-max-tokens` (largest first, one
memory pool for all); larger steps, draft-tree steps, and steps with more requests than the
backend was sized for run eagerly. `features` works as in the decode graphs (EAGLE's hidden
states, copied into a static buffer inside each capture).
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch
from pegboard.core.cuda_graph import Features, GraphRows, capture_graph, padded_size
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, Request

log = logging.getLogger("pegboard.cuda_graph_mixed")

#: `--cuda-graph-mixed-max-tokens`' default (capped at the step's token budget, 8,192 by
#: default): every chunked-prefill step replays a graph. Launching one eagerly costs the host
#: ~1 ms per layer whatever its size (~30 ms for Qwen3-0.6B), more than the device needs even
#: for 8,192 tokens (~17.5 ms on the H200, docs/benchmarks.md, session 8).
DEFAULT_MAX_TOKENS = 8192


def mixed_token_sizes(max_tokens: int) -> list[int]:
    """The token counts mixed graphs are captured for: powers of two from 2 to 32 (up to 8 a
    batch and its bucket then round to the same GEMV configuration, `core/kernels/gemv.py`),
    then four steps per doubling from 64 (64, 80, 96, 112, 128, 160, ...; at most 25 % padding),
    up to and always including `max_tokens` (empty for 0)."""
    sizes = [s for s in (2, 4, 8, 16, 32) if s < max_tokens]
    size = 64
    while size < max_tokens:
        sizes.append(size)
        size += 1 << max(size.bit_length() - 3, 0)  # a quarter of the power of two below
    return sizes + [max_tokens] if max_tokens >= 1 else []


def mixed_graph_max_tokens(config) -> int:
    """The largest mixed graph an `EngineConfig` asks for: 0 with graphs disabled, and never
    past one step's token budget."""
    if config.disable_cuda_graph or not config.cuda_graph_max_bs:
        return 0
    return min(config.cuda_graph_mixed_max_tokens, config.max_num_batched_tokens)


def mixed_graph_unsupported_reason(backend: AttentionBackend, max_tokens: int) -> str | None:
    """Why mixed graphs are off for this backend and setting (decode graphs being on), or
    None."""
    if max_tokens < 1:
        return "mixed-step CUDA graphs are disabled (--cuda-graph-mixed-max-tokens 0)"
    if not getattr(backend, "supports_cuda_graph_mixed", False):
        return f"the attention backend {type(backend).__name__} has no mixed-step CUDA graphs"
    return None


class MixedGraphRunner(GraphRows):
    """Mixed-step graphs of one model with one attention backend, one per token count of
    `sizes`, over the backend's metadata fixed for `max_requests` requests (the decode graphs'
    `prepare_for_capture` must have run).

    `capture=False` builds the same runner without a device: each "graph" runs the model
    eagerly over the static rows, so the layout (bucket, static inputs, padding, output rows)
    can be checked on a CPU. `num_replays` counts replayed steps.
    """

    logits: torch.Tensor | None = None  # no LM head in these graphs: the runner runs it

    def __init__(
        self,
        model: torch.nn.Module,
        attention: AttentionBackend,
        sizes: list[int],
        max_requests: int,
        device: torch.device,
        features: Features | None = None,
        capture: bool = True,
    ) -> None:
        self.model = model
        self.attention = attention
        self.sizes = sizes
        self.max_tokens = sizes[-1]
        self.max_requests = max_requests
        self.features_fn = features
        self.num_replays = 0
        n = self.max_tokens
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        attention.prepare_for_mixed_capture(n)
        self.pool = torch.cuda.graph_pool_handle() if capture else None
        self.graphs: dict[int, torch.cuda.CUDAGraph | _EagerGraph] = {}
        start, reserved = time.perf_counter(), _reserved(device)
        with torch.inference_mode():
            for size in reversed(sizes):  # largest first: smaller ones reuse its pool blocks
                self.graphs[size] = self._capture(size) if capture else _EagerGraph(self, size)
        if capture:
            torch.cuda.synchronize(device)
        #: What capturing cost: seconds, and device memory the graphs (and buffers) hold.
        self.capture_s = time.perf_counter() - start
        self.capture_bytes = _reserved(device) - reserved
        if capture:
            log.info(
                "captured mixed-step CUDA graphs for token counts %s in %.2f s, %.0f MiB",
                sizes,
                self.capture_s,
                self.capture_bytes / 2**20,
            )

    def report(self) -> dict:
        """Replays so far, buckets, and what capturing them cost (seconds, MiB)."""
        return {
            "replays": self.num_replays,
            "sizes": len(self.sizes),
            "capture_s": round(self.capture_s, 3),
            "capture_mib": round(self.capture_bytes / 2**20, 1),
        }

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether `batch` replays a graph: not decode-only (the decode graphs' case), no draft
        tree, at most `max_tokens` tokens and `max_requests` requests."""
        return (
            batch.num_tokens <= self.max_tokens
            and batch.num_requests <= self.max_requests
            and batch.tree_masks is None
            and not batch.is_decode_only
        )

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Lay `batch` out in its bucket's static rows, prepare the backend and replay; the
        final hidden states `[batch tokens, hidden]` in the batch's row order, valid until the
        next replay (and `features`, the same rows, if captured)."""
        t = batch.num_tokens
        size = padded_size(t, self.sizes)
        self.attention.prepare_mixed(self.layout(batch, size))
        self.graphs[size].replay()
        self.num_replays += 1
        if self.feature_buffer is not None:
            self.features = self.feature_buffer[:t]
        return self.hidden[:t]

    def layout(self, batch: ForwardBatch, size: int) -> ForwardBatch:
        """`batch` in the first `size` static rows: its tokens in rows `0 .. T-1`, the rest
        padding with slot -1 (their ids and positions are whatever an earlier step left: valid
        values, read only by their own rows)."""
        t = batch.num_tokens
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.slot_mapping)
        if size > t:
            self.slot_mapping[t:size].fill_(-1)
        return dataclasses.replace(
            batch,
            input_ids=self.input_ids[:size],
            positions=self.positions[:size],
            slot_mapping=self.slot_mapping[:size],
        )

    def _capture(self, size: int) -> torch.cuda.CUDAGraph:
        """The graph of the model over `size` static rows, prepared with a one-token request
        (a graph's launch depends only on its rows; the warm-up compiles kernels uncaptured)."""
        self.prepare_capture(size)
        return capture_graph(self._run, size, self.pool)

    def prepare_capture(self, size: int) -> None:
        """Prepare the backend for the capture of `size` rows: one one-token request, padded
        (`pegboard.core.bench.triton_keys` rehearses the capture's warm-up on a CPU)."""
        one = ForwardBatch(
            requests=[Request([0], request_id="cuda-graph-mixed")],
            input_ids=self.input_ids[:1],
            positions=self.positions[:1],
            slot_mapping=self.slot_mapping[:1],
            query_lens_cpu=[1],
            seq_lens_cpu=[1],
            page_tables_cpu=[[0]],
            logits_indices=torch.zeros(1, dtype=torch.int64, device=self.input_ids.device),
            samples=[True],
        )
        self.attention.prepare_mixed(self.layout(one, size))

    def _run(self, rows: int) -> None:
        self._keep(self._forward(rows), rows)


def _reserved(device: torch.device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


class _EagerGraph:
    """A CPU stand-in for a captured graph (`capture=False`): replaying runs the model over
    the same static rows eagerly."""

    def __init__(self, runner: MixedGraphRunner, rows: int) -> None:
        self.runner, self.rows = runner, rows

    def replay(self) -> None:
        self.runner._run(self.rows)
