"""CUDA graphs for decode steps: capture the model once per batch-size bucket, then replay.

A decode step of a small batch is bound by the host launching kernels one by one (docs/
benchmarks.md: ~37 ms/token for Llama-3.1-8B at batch 1, of which ~6 ms is GPU work). A CUDA
graph records the model's forward (embedding, every layer, final norm) and, for decode
graphs, the LM head (with tensor parallelism its all-gather of the vocabulary shards, an NCCL
collective like the layers' all-reduces) once and replays it with one launch. A graph fixes
the addresses and shapes of everything it touches, so:

- the batch is padded up to the next captured size (`capture_sizes`, `padded_size`);
- the token ids, positions and KV slots are copied into static tensors the graph reads;
  padded rows get slot -1, which the attention backend's store skips, so they write no KV, and
  every operation is row-wise, so they never touch a real row's output;
- the attention backend keeps its per-step metadata in tensors whose addresses never change
  (`AttentionBackend.prepare_for_capture`), refilled by its ordinary `prepare` before replay.

Only decode-only batches (one new token per request) of at most the largest captured size
replay; everything else runs eagerly. All sizes share one memory pool, captured largest first
so smaller graphs reuse its blocks.

Logits in the graph: a decode graph writes the logits of all its rows (padding too) into one
static buffer `[rows, vocab]` in `logits_dtype` (the runner's: the model's own dtype, so the
copy casts nothing; see `ModelRunner.forward`), so a decode step needs no launch after the
replay. The buffer costs `rows * vocab * element size` bytes (Qwen3-0.6B in bf16, 151,936
tokens, 256 rows: 78 MB, next to its ~1.2 GB of weights); it is capped at `LOGITS_MAX_BYTES`,
and graphs of more rows than fit leave the LM head to the model runner, as verify graphs do
(their rows are many per request).

Speculative verify steps (`query_lens`, e.g. `[k + 1]` for k drafts; backends with
`supports_cuda_graph_verify`) get graphs too, one per (batch size, query length `q`): request
`i`'s tokens sit at rows `i * q ...` of the static inputs, a request with fewer than `q` new
tokens (fewer drafts, a plain decode, a short prefill) is padded at its end with rows of slot
-1 (causal attention never lets a real token see them), and the backend is prepared for the
padded layout (every request `q` new tokens). Any batch without a draft tree whose requests
each run at most `q` tokens replays the smallest such `q`; the hidden states come back in the
batch's own row order.

Verify steps with draft trees (`ForwardBatch.tree_masks`; backends with
`supports_cuda_graph_tree_verify`) replay graphs of their own, one per (batch size, `q` in
`tree_query_lens`), captured with the backend's tree-mask tensors fixed: request `i`'s mask
(over its `k` tree tokens, after its last token) is padded to `[q - 1, q - 1]` so that it
covers the request's padded rows too (those see the rows before them; no real row sees a
padded one), a request without a tree has none, and the backend writes the masks into the
fixed tensors before the replay. A tree batch never replays a chain graph (their kernels
differ); a chain batch replays a tree graph when no chain graph fits (a tree speculator's
step where no request got a tree).

`features` (speculators that read the target's hidden states, EAGLE): a function run right
after the model inside every capture (and after every eager forward, by the model runner)
whose result is copied into a static buffer and handed back with the hidden states, since a
replay runs no forward hooks.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Callable

import numpy as np
import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, Request

log = logging.getLogger("pegboard.cuda_graph")

#: The most device memory the decode graphs' static logits buffer may take; graphs of more
#: rows than it holds leave the LM head out (the model runner runs it eagerly, on real rows).
LOGITS_MAX_BYTES = 512 << 20
#: Verify layouts whose static row index is kept (`_destination`), and padded tree masks
#: (`padded_tree_masks`); both are cleared when full.
DESTINATIONS_KEPT = 256


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


def capture_graph(run: Callable[[int], object], size: int, pool) -> torch.cuda.CUDAGraph:
    """The CUDA graph of `run(size)` in memory pool `pool`, warmed up once uncaptured first
    (kernels compile, GEMMs are picked)."""
    run(size)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run(size)
    return graph


def graph_unsupported_reason(device: torch.device, backend: AttentionBackend) -> str | None:
    """Why decode graphs cannot run with this device and backend, or None if they can."""
    if device.type != "cuda":
        return f"the model is on {device.type}, CUDA graphs need a CUDA device"
    if not backend.supports_cuda_graph:
        return f"the attention backend {type(backend).__name__} does not support CUDA graphs"
    return None


Features = Callable[[], "torch.Tensor | None"]


class GraphRows:
    """What a graph runner's graphs run (decode and verify here, mixed steps in
    `cuda_graph_mixed`): the model over the first rows of the static inputs, its output (and
    `features_fn`'s, the target features) kept in static buffers, `hidden` and
    `feature_buffer`, sized by the first (largest) run over all of `input_ids`' rows."""

    model: torch.nn.Module
    attention: AttentionBackend
    input_ids: torch.Tensor
    positions: torch.Tensor
    features_fn: Features | None = None
    hidden: torch.Tensor | None = None  # the graphs' output, [rows, hidden]
    feature_buffer: torch.Tensor | None = None  # `features_fn`'s output in the graphs' rows
    features: torch.Tensor | None = None  # the last replay's features, batch row order

    def _forward(self, rows: int) -> torch.Tensor:
        return self.model(self.input_ids[:rows], self.positions[:rows], self.attention)

    def _keep(self, out: torch.Tensor, rows: int, into_static: bool = True) -> None:
        """Run `features_fn` after the model and, `into_static`, copy both outputs' rows."""
        feats = self.features_fn() if self.features_fn is not None else None
        if self.hidden is None:  # sized by the first (largest) shape
            self.hidden = out.new_empty(self.input_ids.shape[0], out.shape[-1])
            if feats is not None:
                self.feature_buffer = feats.new_empty(self.input_ids.shape[0], feats.shape[-1])
        if into_static:
            self.hidden[:rows].copy_(out)
            if feats is not None:
                self.feature_buffer[:rows].copy_(feats)


class CUDAGraphRunner(GraphRows):
    """Decode graphs of one model with one attention backend, for each of `sizes` (and verify
    graphs for each of `query_lens` where the backend supports them).

    Built (and captured) when the runner binds an attention backend; a new backend or KV pool
    means a new `CUDAGraphRunner`. `max_requests` bounds every batch the backend will be
    prepared for (graphs or not), so the backend can size its metadata once for all of them.
    `num_replays` counts replayed steps (`num_verify_replays` those of verify graphs).

    With `vocab_size`, decode graphs of up to `logits_max_size` rows also run the model's
    `compute_logits` on every row (see the module docstring); `logits` is then the last
    replay's logits (`logits_dtype`), batch row order, valid until the next replay (None: that replay
    ran no LM head).
    """

    query_lens: tuple[int, ...] = ()  # verify graphs' query lengths (> 1), ascending
    tree_query_lens: tuple[int, ...] = ()  # tree verify graphs' query lengths, ascending
    num_verify_replays = 0
    num_tree_replays = 0  # of them, replays of tree verify graphs
    logits_max_size = 0  # decode graphs of at most this many rows compute the logits
    logits_buffer: torch.Tensor | None = None  # their logits, `[rows, vocab]`
    logits: torch.Tensor | None = None  # the last replay's logits rows, or None
    _dests: dict[tuple[int, ...], torch.Tensor] | None = None  # `_destination`'s

    def __init__(
        self,
        model: torch.nn.Module,
        attention: AttentionBackend,
        sizes: list[int],
        max_requests: int,
        max_model_len: int,
        page_size: int,
        device: torch.device,
        query_lens: list[int] = (),
        features: Features | None = None,
        tree_query_lens: list[int] = (),
        vocab_size: int = 0,
        logits_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model = model
        self.attention = attention
        self.sizes = sizes
        self.max_batch_size = sizes[-1]
        self.max_model_len = max_model_len
        self.num_replays = 0
        if not getattr(attention, "supports_cuda_graph_verify", False):
            query_lens = ()
        self.query_lens = tuple(sorted({q for q in query_lens if q > 1}))
        if not getattr(attention, "supports_cuda_graph_tree_verify", False):
            tree_query_lens = ()
        self.tree_query_lens = tuple(sorted({q for q in tree_query_lens if q > 1}))
        self.features_fn = features
        longest = max(self.query_lens + self.tree_query_lens, default=1)
        n = self.max_batch_size * longest  # rows of the largest graph
        self.input_ids = torch.zeros(n, dtype=torch.int64, device=device)
        self.positions = torch.zeros(n, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((n,), -1, dtype=torch.int64, device=device)
        if vocab_size:
            size = torch.empty((), dtype=logits_dtype).element_size()
            self.logits_max_size = min(self.max_batch_size, LOGITS_MAX_BYTES // (size * vocab_size))
            self.logits_buffer = torch.empty(
                self.logits_max_size, vocab_size, dtype=logits_dtype, device=device
            )
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.verify_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.tree_graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        if self.tree_query_lens:
            attention.prepare_for_capture(
                max(max_requests, self.max_batch_size),
                max_query_len=longest,
                max_tree=self.tree_query_lens[-1] - 1,
            )
        elif self.query_lens:
            attention.prepare_for_capture(
                max(max_requests, self.max_batch_size), max_query_len=self.query_lens[-1]
            )
        else:
            attention.prepare_for_capture(max(max_requests, self.max_batch_size))
        self._capture_all(max_model_len, page_size)

    def can_run(self, batch: ForwardBatch) -> bool:
        """Whether `batch` replays a graph: no larger than the largest size, and decode-only
        or (with verify graphs) no request running more than the longest verify query length
        of its kind, chain or tree (nor past the context length once padded)."""
        if batch.num_requests > self.max_batch_size:
            return False
        if batch.is_decode_only:
            return True
        return self._verify_shape(batch) is not None

    def _verify_shape(self, batch: ForwardBatch) -> tuple[int, bool] | None:
        """The query length of the verify graph for `batch` and whether it is a tree graph,
        or None if none fits: a chain graph for a batch without trees, else a tree graph."""
        tree = batch.tree_masks is not None
        q = None if tree else _fitting(self.query_lens, batch.query_lens_cpu)
        if q is None:
            q, tree = _fitting(self.tree_query_lens, batch.query_lens_cpu), True
        if q is None or any(
            s - n + q > self.max_model_len for s, n in zip(batch.seq_lens_cpu, batch.query_lens_cpu)
        ):
            return None  # padded rows would run past the page table
        return q, tree

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Prepare the attention backend for `batch` and run it through the graph of its
        padded size (and query length); the final hidden states `[batch tokens, hidden]`,
        valid until the next replay (and `features`, the same rows, if captured)."""
        if not batch.is_decode_only:
            return self._replay_verify(batch)
        self.attention.prepare(batch)
        n = batch.num_requests
        size = padded_size(n, self.sizes)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        if size > n:
            self.slot_mapping[n:size].fill_(-1)  # padded rows store no KV
        self.graphs[size].replay()
        self.num_replays += 1
        if self.feature_buffer is not None:
            self.features = self.feature_buffer[:n]
        self.logits = self.logits_buffer[:n] if size <= self.logits_max_size else None
        return self.hidden[:n]

    def _replay_verify(self, batch: ForwardBatch) -> torch.Tensor:
        n, (q, tree) = batch.num_requests, self._verify_shape(batch)
        size = padded_size(n, self.sizes)
        rows = size * q
        lens = batch.query_lens_cpu
        uniform = all(k == q for k in lens)
        self.slot_mapping[:rows].fill_(-1)  # padding stores no KV
        if uniform:  # every request runs q tokens: the batch's rows are the first n * q
            dest = None
            self.input_ids[: n * q].copy_(batch.input_ids)
            self.positions[: n * q].copy_(batch.positions)
            self.slot_mapping[: n * q].copy_(batch.slot_mapping)
        else:
            dest = self._destination(lens, q)
            self.input_ids.index_copy_(0, dest, batch.input_ids)
            self.positions.index_copy_(0, dest, batch.positions)
            self.slot_mapping.index_copy_(0, dest, batch.slot_mapping)
        padded = self._padded(batch, size, q)
        if tree:
            masks = batch.tree_masks or [None] * n
            padded.tree_masks = padded_tree_masks(masks, lens, size, q)
        self.attention.prepare(padded)
        (self.tree_graphs if tree else self.verify_graphs)[(size, q)].replay()
        self.logits = None
        self.num_replays += 1
        self.num_verify_replays += 1
        self.num_tree_replays += tree
        take = (lambda t: t[: n * q]) if dest is None else (lambda t: t[dest])
        if self.feature_buffer is not None:
            self.features = take(self.feature_buffer)
        return take(self.hidden)

    def _destination(self, lens: list[int], q: int) -> torch.Tensor:
        """The static rows of a verify batch's rows (request `i`'s at `i * q ...`), kept per
        layout: a batch of one request has at most `q` of them, so no upload per step."""
        if self._dests is None:
            self._dests = {}
        key = (q, *lens)
        dest = self._dests.get(key)
        if dest is None:
            index = np.concatenate([np.arange(k) + i * q for i, k in enumerate(lens)])
            dest = to_device(index, self.input_ids.device, torch.int64)
            if len(self._dests) >= DESTINATIONS_KEPT:
                self._dests.clear()
            self._dests[key] = dest
        return dest

    def _padded(self, batch: ForwardBatch, size: int, q: int) -> ForwardBatch:
        """`batch` as the verify graph's layout: `size` requests of `q` new tokens each (a
        request's cached prefix unchanged; padded requests: `q` tokens over page 0)."""
        n = batch.num_requests
        seq_lens = [s - k + q for s, k in zip(batch.seq_lens_cpu, batch.query_lens_cpu)]
        tables = list(batch.page_tables_cpu)
        array = batch.page_tables_array
        if size > n:
            seq_lens += [q] * (size - n)
            tables += [[0]] * (size - n)
            if array is not None:
                array = np.concatenate([array, np.zeros((size - n, array.shape[1]), array.dtype)])
        return ForwardBatch(
            requests=batch.requests,
            input_ids=self.input_ids[: size * q],
            positions=self.positions[: size * q],
            slot_mapping=self.slot_mapping[: size * q],
            query_lens_cpu=[q] * size,
            seq_lens_cpu=seq_lens,
            page_tables_cpu=tables,
            logits_indices=batch.logits_indices,
            samples=[True] * size,
            page_tables_array=array,
        )

    @torch.inference_mode()
    def _capture_all(self, max_model_len: int, page_size: int) -> None:
        pages = -(-max_model_len // page_size)
        self.pool = torch.cuda.graph_pool_handle() if self.input_ids.is_cuda else None
        shapes = [(size, q, False) for size in self.sizes for q in (1, *self.query_lens)]
        shapes += [(size, q, True) for size in self.sizes for q in self.tree_query_lens]
        for size, q, tree in sorted(shapes, key=lambda s: -s[0] * s[1]):  # the most rows first
            # The longest context makes the backend pick its decode plan (split count) for
            # the longest requests; shorter ones replay the same plan with idle splits.
            rows = size * q
            batch = ForwardBatch(
                requests=[Request([0], request_id=f"cuda-graph-{i}") for i in range(size)],
                input_ids=self.input_ids[:rows],
                positions=self.positions[:rows],
                slot_mapping=self.slot_mapping[:rows],
                query_lens_cpu=[q] * size,
                seq_lens_cpu=[max_model_len] * size,
                page_tables_cpu=[[0] * pages] * size,
                logits_indices=torch.arange(size, device=self.input_ids.device),
                samples=[True] * size,
            )
            if tree:  # the backend's fixed tree tensors, read by the tree kernel
                batch.tree_masks = padded_tree_masks([None] * size, [q] * size, size, q)
            self.attention.prepare(batch)
            graph = self._capture(rows, with_logits=q == 1 and size <= self.logits_max_size)
            if tree:
                self.tree_graphs[(size, q)] = graph
            elif q == 1:
                self.graphs[size] = graph
            else:
                self.verify_graphs[(size, q)] = graph
        if self.input_ids.is_cuda:
            torch.cuda.synchronize()
        log.info(
            "captured CUDA graphs for batch sizes %s (verify query lengths %s, trees %s%s; "
            "LM head in decode graphs of up to %d rows)",
            self.sizes,
            list(self.query_lens) or "none",
            list(self.tree_query_lens) or "none",
            ", with target features" if self.features_fn else "",
            self.logits_max_size,
        )

    def _capture(self, rows: int, with_logits: bool):
        """The graph of the model (and the LM head, `with_logits`) over the first `rows`
        static rows (the backend prepared)."""
        self._run(rows, with_logits=with_logits)  # warm up: compiles kernels, picks GEMMs
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self._run(rows, into_static=True, with_logits=with_logits)
        return graph

    def _run(self, rows: int, into_static: bool = False, with_logits: bool = False) -> None:
        out = self._forward(rows)
        if with_logits:  # straight into the static buffer
            self.model.compute_logits(out, out=self.logits_buffer[:rows])
        self._keep(out, rows, into_static)


def _fitting(query_lens: tuple[int, ...], lens: list[int]) -> int | None:
    """The smallest of `query_lens` (ascending) holding the longest of `lens`, or None."""
    i = bisect.bisect_left(query_lens, max(lens))
    return query_lens[i] if i < len(query_lens) else None


def padded_tree_masks(
    masks: list[torch.Tensor | None], lens: list[int], size: int, q: int
) -> list[torch.Tensor | None]:
    """Tree masks for the padded verify layout: `size` requests of `q` rows, request `i`'s
    `lens[i]` real rows first. A request's `[k, k]` mask over its last `k` real rows becomes
    `[q - 1, q - 1]` over its last `q - 1` rows (the kernel places a mask at the request's
    end): the tree's own bits top left, its padded rows causal after it; requests past the
    batch and those without a tree get none."""
    out: list[torch.Tensor | None] = [None] * size
    if q < 2:
        return out
    for i, (mask, n) in enumerate(zip(masks, lens)):
        if mask is None:
            continue
        k = mask.shape[0]
        start = n - 1 - k  # the tree's first row among the request's last q - 1 (0 unpadded)
        key = (id(mask), start, q)
        kept = _PADDED_MASKS.get(key)
        if kept is not None and kept[0] is mask:  # the same (cached) mask: the same result
            out[i] = kept[1]
            continue
        full = torch.ones(q - 1, q - 1, dtype=torch.bool).tril_()
        full[start : start + k, start : start + k] = mask.to("cpu", torch.bool)
        full[start : start + k, :start] = True
        out[i] = full
        if len(_PADDED_MASKS) >= DESTINATIONS_KEPT:
            _PADDED_MASKS.clear()
        _PADDED_MASKS[key] = (mask, full)  # holds `mask`: its id is not reused meanwhile
    return out


#: `padded_tree_masks`' results for masks seen before (`tree.ancestor_mask` keeps one per
#: tree shape): (id(mask), start, q) -> (mask, padded mask). Nobody changes either tensor.
_PADDED_MASKS: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
