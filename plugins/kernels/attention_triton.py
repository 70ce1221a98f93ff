"""The `triton` attention backend: paged attention in Triton kernels.

Per step, `prepare` fills fixed-capacity device tensors in place (one host-to-device copy
each, no device sync): the padded page-table matrix `[requests, pages]`, and per request the
sequence lengths, query start offsets (cu_seqlens) and cached-prefix lengths; for a batch
with prefill tokens also the extend kernel's query-block map. Per layer, `forward` stores the
new keys and values with the store-KV kernel, then runs the split-K paged decode kernel when
every request has one new token, and the extend kernel (cached prefix plus causal new tokens)
otherwise. The kernels live in `pegboard.plugins.kernels.triton_attention`; docs/kernels.md
describes them.

This module imports Triton only when a backend is built, so `pegboard plugins` lists the
plugin on machines without Triton; selecting it there fails with the reason.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
from typing import ClassVar

import numpy as np
import pydantic
import torch
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.device import upload
from pegboard.sdk.slots import Attention, AttentionBackend, KVStoreTarget, Plugin, PluginContext
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo

#: Page tables of at most this many entries are remembered after their upload, so the next
#: step skips uploading the same one (comparing a larger one would cost more than it saves).
PAGE_TABLE_HELD_MAX = 4096
#: Block maps kept per query-length layout (batches of at most this many requests; cleared
#: when full).
BLOCK_MAPS_KEPT = 64


class TritonAttentionOptions(pydantic.BaseModel):
    """Options of `TritonAttention`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    decode_splits: int = pydantic.Field(
        0,
        ge=0,
        le=64,
        description=(
            "Splits of each request's KV length in the decode kernel (flash-decoding), merged "
            "by a reduce kernel. 0: chosen per step from the batch size, context length and "
            "number of SMs."
        ),
    )


class TritonAttentionBackend(AttentionBackend):
    """Paged attention (`pegboard.sdk.AttentionBackend`) with Triton kernels.

    Metadata tensors are allocated once and refilled in place each step, so their addresses
    stay fixed while the batch fits their capacity (they grow, by doubling, when a step needs
    more requests or pages). `forward` never synchronises with the device: the step's sizes
    come from the host lists of the `ForwardBatch`.

    CUDA graphs: `prepare_for_capture` sizes the metadata and the split workspace for every
    batch the engine will run, after which they are never replaced (a batch that would need
    more raises instead). A replayed decode graph keeps the split count of its capture, which
    is correct for any context length (splits past a request's end do no work). Padded rows
    have sequence length 0 and slot -1: they store nothing and read no keys. Verify graphs
    (`supports_cuda_graph_verify`): a batch of `B` requests with `q` new tokens each launches
    `B * ceil(q / tokens_per_block)` extend programs over a block map of the same layout, so
    any such batch replays a capture made for another; the block map is sized for the longest
    `max_query_len` at capture and never replaced (a longer eager batch uses a spare one).
    Mixed graphs (`supports_cuda_graph_mixed`): `prepare_mixed` pads the block map of a batch
    laid out in `R` rows with blocks of request -1 (no work) up to the most blocks any batch of
    `R` tokens can have (`max_blocks`), in a block map of its own, so the extend kernel's grid
    depends only on `R`.

    Tree verify graphs (`supports_cuda_graph_tree_verify`): `prepare_for_capture(...,
    max_tree=n)` also fixes the tree mask's tensors (per request `[n, n]` int8 bits and its
    meta row); `prepare` writes any batch's masks into them when they fit (zero meta rows for
    requests without a tree), so a tree graph reads the step's masks.
    """

    supports_cuda_graph = True
    #: Verify steps (every request `q` new tokens, no draft tree) replay as CUDA graphs too.
    supports_cuda_graph_verify = True
    #: ... and verify steps with draft trees, their masks in fixed tensors (`max_tree`).
    supports_cuda_graph_tree_verify = True
    #: Mixed steps (prefill and decode tokens) replay as CUDA graphs per token count.
    supports_cuda_graph_mixed = True
    #: Reads and writes an FP8 KV pool (`--kv-cache-dtype fp8_e4m3`) with per-layer scales.
    supports_fp8_kv = True
    #: Value layouts it reads (`KVPool.v_layout`): over FP8 values stored transposed per page
    #: the decode kernel multiplies in e4m3 on the tensor cores (`decode_fp8mma.py`).
    v_layouts = ("nhd", "hdp")
    #: The extend kernel applies `ForwardBatch.tree_masks` (speculative draft trees).
    supports_tree_mask = True
    #: The model's rope kernel may store the step's K/V (`kv_store_target`, `attend`).
    supports_fused_kv_store = True

    def __init__(
        self,
        model: ModelInfo,
        pool: KVPool,
        scale: float | None = None,
        decode_splits: int = 0,
        max_requests: int = 64,
    ) -> None:
        super().__init__(model, pool, scale)
        from pegboard.plugins.kernels import triton_attention

        if model.num_heads % model.num_kv_heads:
            raise ValueError(
                f"num_heads ({model.num_heads}) must be a multiple of num_kv_heads "
                f"({model.num_kv_heads})"
            )
        self.kernels = triton_attention
        self.decode_splits = decode_splits
        self.device = pool.k[0].device if pool.k else model.device
        self.group = model.num_heads // model.num_kv_heads
        self.tokens_per_block = triton_attention.tokens_per_block(self.group)
        self.decode_block_n = triton_attention.decode_block_n(model.head_dim)
        self.batch: ForwardBatch | None = None
        self.tree: tuple[torch.Tensor, torch.Tensor] | None = None  # (meta, bits) of the step
        self.is_decode = False
        self.num_splits = 1
        self.num_blocks = 0
        self.max_requests = 0
        self.max_pages = 0
        self.max_blocks = 0
        self.max_splits = 0
        self.step_block_map: torch.Tensor | None = None  # this step's (`block_map` or a spare)
        self.fixed_blocks = False
        self.fixed = False  # set by prepare_for_capture: captured graphs hold the addresses
        self.mixed_block_map: torch.Tensor | None = None  # `prepare_for_mixed_capture`'s
        self._block_map_held: tuple[torch.Tensor, np.ndarray] | None = None  # last upload
        self._page_table_held: tuple[torch.Tensor, np.ndarray] | None = None  # last (small) one
        self._block_maps: dict[tuple[int, ...], np.ndarray] = {}  # `_block_map`'s
        self._tree_held: tuple[tuple, list] | None = None  # (tree_static, masks written there)
        self.tree_static: tuple[torch.Tensor, torch.Tensor] | None = None  # tree graphs' masks
        #: The step's decode launch order: (rows, capturing, order), `_launch_order`'s
        self._order: tuple[int, bool, torch.Tensor | None] | None = None
        self._reserve(max_requests, -(-model.max_model_len // pool.page_size), 0, 0)

    def prepare_for_capture(
        self, max_requests: int, max_query_len: int = 1, max_tree: int = 0
    ) -> None:
        """Size the metadata and the decode split workspace for batches of up to
        `max_requests` requests and any context length (and the extend block map for
        `max_query_len` new tokens each: verify graphs; the tree mask's tensors for
        `[max_tree, max_tree]` masks: tree verify graphs), then keep them fixed."""
        splits = self.decode_splits or self.kernels.choose_num_splits(
            1, self.model.num_kv_heads, self.model.max_model_len, self.device, self.decode_block_n
        )
        blocks = max_requests * -(-max_query_len // self.tokens_per_block)
        self.fixed = self.fixed_blocks = False  # a new capture (the old graphs are dropped)
        self._reserve(max_requests, self.max_pages, blocks, splits if splits > 1 else 0)
        self.fixed = True
        self.fixed_blocks = max_query_len > 1  # verify graphs read the block map
        self.tree_static = None
        if max_tree > 0:
            cap = self.max_requests
            self.tree_static = (
                torch.zeros(cap, 3, dtype=torch.int32, device=self.device),
                torch.zeros(cap * max_tree * max_tree, dtype=torch.int8, device=self.device),
            )

    def prepare_for_mixed_capture(self, max_tokens: int) -> None:
        """Size a block map of its own for mixed batches padded to up to `max_tokens` rows
        (after `prepare_for_capture`, whose request capacity bounds their blocks)."""
        if not self.fixed:
            raise RuntimeError("prepare_for_capture must come before prepare_for_mixed_capture")
        blocks = self._mixed_blocks(max_tokens)
        self.mixed_block_map = torch.zeros(blocks, 2, dtype=torch.int32, device=self.device)

    def _mixed_blocks(self, rows: int) -> int:
        return self.kernels.max_blocks(rows, self.max_requests, self.tokens_per_block)

    def prepare_mixed(self, batch: ForwardBatch) -> None:
        """`prepare` for a batch padded to a mixed CUDA graph's `batch.num_tokens` rows (rows
        past its requests' new tokens have slot -1): the extend kernel's grid and block map
        then depend only on that row count."""
        self._prepare(batch, padded=True)

    def _reserve(self, requests: int, pages: int, blocks: int, splits: int) -> None:
        """Grow the metadata tensors (and the decode workspace) to hold at least this much."""
        dev = self.device
        if self.fixed and (
            requests > self.max_requests or pages > self.max_pages or splits > self.max_splits
        ):
            raise RuntimeError(
                f"a batch of {requests} requests, {pages} pages and {splits} decode splits "
                f"exceeds the capacity fixed for CUDA graphs ({self.max_requests} requests, "
                f"{self.max_pages} pages, {self.max_splits} splits)"
            )
        if requests > self.max_requests or pages > self.max_pages:
            self.max_requests = max(self.max_requests, _pow2(requests))
            self.max_pages = max(self.max_pages, _pow2(pages))
            cap = self.max_requests
            self.page_table = torch.zeros(cap, self.max_pages, dtype=torch.int32, device=dev)
            self.request_meta = torch.zeros(3 * cap + 1, dtype=torch.int32, device=dev)
            self.seq_lens = self.request_meta[:cap]
            self.query_starts = self.request_meta[cap : 2 * cap + 1]
            self.prefix_lens = self.request_meta[2 * cap + 1 :]
            # `_launch_order`'s sort output (fixed addresses: graphs read them at replay)
            self.order_buffers = (
                torch.zeros(cap, dtype=torch.int32, device=dev),
                torch.zeros(cap, dtype=torch.int64, device=dev),
            )
            self.max_splits = 0  # the workspace is sized by requests too
        if blocks > self.max_blocks and not self.fixed_blocks:
            self.max_blocks = _pow2(blocks)
            self.block_map = torch.zeros(self.max_blocks, 2, dtype=torch.int32, device=dev)
        if splits > self.max_splits:
            self.max_splits = splits
            self.workspace = self.kernels.decode_workspace(
                self.max_requests, self.model.num_heads, splits, self.model.head_dim, dev
            )

    def prepare(self, batch: ForwardBatch) -> None:
        """Fill the step's metadata on the host, copy it into the fixed device tensors and
        pick the kernel (decode when every request has one new token) and its split count."""
        self._prepare(batch)

    def _prepare(self, batch: ForwardBatch, padded: bool = False) -> None:
        self._order = None
        num_requests = batch.num_requests
        max_pages = max(map(len, batch.page_tables_cpu))
        self.is_decode = batch.is_decode_only and not padded
        if self.is_decode:
            self.num_splits = self.decode_splits or self.kernels.choose_num_splits(
                num_requests,
                self.model.num_kv_heads,
                max(batch.seq_lens_cpu),
                self.device,
                self.decode_block_n,
            )
            self._reserve(num_requests, max_pages, 0, self.num_splits if self.num_splits > 1 else 0)
        query_lens = np.asarray(batch.query_lens_cpu, dtype=np.int32)
        seq_lens = np.asarray(batch.seq_lens_cpu, dtype=np.int32)
        if not self.is_decode:
            block_map = self._block_map(batch.query_lens_cpu, query_lens)
            self._reserve(num_requests, max_pages, 0 if padded else len(block_map), 0)
            if padded:  # every batch of these rows launches the same grid
                block_map = self._padded_block_map(block_map, batch.num_tokens)
            self.num_blocks = len(block_map)
            if padded:
                self.step_block_map = self.mixed_block_map
                _upload(self.mixed_block_map[: self.num_blocks], block_map)
            elif self.num_blocks <= self.max_blocks:
                self.step_block_map = self.block_map
                self._upload_block_map(block_map)
            else:  # the block map is fixed for verify graphs: a longer eager batch's own
                self.step_block_map = torch.from_numpy(block_map).to(self.device)
        self.tree = self._tree_inputs(batch.tree_masks)

        cap = self.max_requests
        meta = np.zeros(3 * cap + 1, dtype=np.int32)
        meta[:num_requests] = seq_lens
        np.cumsum(query_lens, out=meta[cap + 1 : cap + 1 + num_requests])
        meta[2 * cap + 1 : 2 * cap + 1 + num_requests] = seq_lens - query_lens
        _upload(self.request_meta, meta)
        table = batch.page_tables_array  # the core's incremental copy, else built here
        if table is None or table.shape[1] != max_pages:
            table = _pad_rows(batch.page_tables_cpu, max_pages)
        self._upload_page_table(table)
        self.batch = batch

    def _block_map(self, lens: list[int], query_lens: np.ndarray) -> np.ndarray:
        """The block map of these query lengths, kept for small batches (a verify graph's
        layout repeats every step; nobody changes a block map once built)."""
        if len(lens) > BLOCK_MAPS_KEPT:
            return self.kernels.build_block_map(query_lens, self.tokens_per_block)
        key = tuple(lens)
        block_map = self._block_maps.get(key)
        if block_map is None:
            block_map = self.kernels.build_block_map(query_lens, self.tokens_per_block)
            if len(self._block_maps) >= BLOCK_MAPS_KEPT:
                self._block_maps.clear()
            self._block_maps[key] = block_map
        return block_map

    def _upload_page_table(self, table: np.ndarray) -> None:
        """Into the first rows of `page_table`, unless a small table is there already (a verify
        step at batch 1 gains a page only every few steps)."""
        last = self._page_table_held
        if (
            last is not None
            and last[0] is self.page_table
            and last[1].shape == table.shape
            and np.array_equal(last[1], table)
        ):
            return
        _upload(self.page_table[: table.shape[0], : table.shape[1]], table)
        small = table.size <= PAGE_TABLE_HELD_MAX
        self._page_table_held = (self.page_table, table.copy()) if small else None  # (the
        # core's page-table mirror may reuse its array)

    def _upload_block_map(self, block_map: np.ndarray) -> None:
        """Into `block_map`, unless it holds these blocks already: a verify graph's step (every
        request `q` rows) has the same map every time, so it is uploaded once, not per step."""
        last = self._block_map_held
        if (
            last is not None
            and last[0] is self.block_map
            and (last[1] is block_map or np.array_equal(last[1], block_map))
        ):
            return
        _upload(self.block_map[: len(block_map)], block_map)
        self._block_map_held = (self.block_map, block_map)  # (kept maps are never changed)

    def _padded_block_map(self, block_map: np.ndarray, rows: int) -> np.ndarray:
        blocks = self._mixed_blocks(rows)
        if self.mixed_block_map is None or blocks > len(self.mixed_block_map):
            raise RuntimeError(
                f"a mixed batch of {rows} rows needs prepare_for_mixed_capture({rows}) first"
            )
        if len(block_map) > blocks:  # more requests than the capacity the bound assumes
            raise RuntimeError(
                f"a batch of {len(block_map)} query blocks exceeds the {blocks} of a mixed "
                f"CUDA graph of {rows} rows"
            )
        return self.kernels.padded_block_map(block_map, blocks)

    def _tree_inputs(
        self, masks: list[torch.Tensor | None] | None
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The extend kernel's tree inputs for `masks`: written into the fixed tensors of tree
        verify graphs when they fit (even with no tree at all: a replay reads them), else
        fresh tensors (None without any tree)."""
        static = self.tree_static
        if masks is None:
            return None
        if static is not None and len(masks) <= static[0].shape[0]:
            held = self._tree_held  # the masks last written there (the core caches masks)
            if held is not None and held[0] is static and _same_masks(held[1], masks):
                return static
            meta, bits = _tree_arrays(masks)
            if bits.numel() <= static[1].numel():
                full = np.zeros(static[0].shape, dtype=np.int32)
                full[: len(masks)] = meta
                _upload(static[0], full)
                if bits.numel():
                    src = bits.pin_memory() if static[1].is_cuda else bits
                    static[1][: bits.numel()].copy_(src, non_blocking=True)
                self._tree_held = (static, list(masks))
                return static
        return _tree_metadata(masks, self.device)

    def decode_on_device(
        self, source: TritonAttentionBackend, seq_lens: torch.Tensor, slot_mapping: torch.Tensor
    ) -> None:
        """A decode step's metadata written on the device, with no host work or upload (CUDA
        graph safe: captured, it is part of each replay): `len(seq_lens)` requests with these
        sequence lengths (a device tensor) over the page-table rows `source` was last prepared
        with, their new keys stored at `slot_mapping`. The kernel's split count stays the one
        of this backend's last `prepare`, which must have been of a decode batch (e.g. before
        a capture). An EAGLE head's draft steps: the catch-up forward's pages, one more key
        per step (`head_graphs.DraftGraphs`)."""
        if not self.is_decode:
            raise RuntimeError("decode_on_device needs a prepared decode batch first")
        n, width = seq_lens.shape[0], source.page_table.shape[1]
        self._order = None
        self.page_table[:n, :width].copy_(source.page_table[:n])
        self.seq_lens[:n].copy_(seq_lens)
        self._page_table_held = None  # changed on the device
        self.batch = dataclasses.replace(self.batch, slot_mapping=slot_mapping)

    def extend_on_device(self, seq_lens: torch.Tensor, prefix_lens: torch.Tensor) -> None:
        """The extend batch of the last `prepare` (same requests, query lengths and page
        tables: e.g. a CUDA graph's padded layout) with new sequence and prefix lengths (device
        tensors, one per request): two device copies, no host work or upload. An EAGLE head's
        catch-up forward, whose requests gain entries but rarely a page
        (`head_graphs.DraftGraphs`)."""
        if self.is_decode or self.batch is None:
            raise RuntimeError("extend_on_device needs a prepared extend batch first")
        n = seq_lens.shape[0]
        self.seq_lens[:n].copy_(seq_lens)
        self.prefix_lens[:n].copy_(prefix_lens)

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store `k`/`v` at the batch's slots, then run the decode or the extend kernel."""
        k_cache, v_cache, slots, k_scale, v_scale = self.kv_store_target(layer)
        self.kernels.store_kv(k, v, k_cache, v_cache, slots, k_scale, v_scale)
        return self.attend(layer, q)

    def _launch_order(self, rows: int) -> torch.Tensor | None:
        """The decode programs' request order of this step (`decode.launch_order`), sorted
        into `order_buffers` at the step's first layer and kept for the others; again when a
        CUDA graph capture starts (the warm-up before it ran eagerly), so the graph holds
        the sort and replays it every step."""
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if self._order is None or self._order[:2] != (rows, capturing):
            order = self.kernels.launch_order(self.seq_lens, rows, self.order_buffers)
            self._order = (rows, capturing, order)
        return self._order[2]

    def kv_store_target(self, layer: int) -> KVStoreTarget:
        """The layer's caches, the step's slots and the FP8 scales (`supports_fused_kv_store`:
        the model's rope kernel may store K/V there itself, then call `attend`)."""
        k_scale, v_scale = self.pool.k_scale(layer), self.pool.v_scale(layer)
        return self.pool.k[layer], self.pool.v[layer], self.batch.slot_mapping, k_scale, v_scale

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """The decode or the extend kernel over the pool, this step's K/V already stored."""
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        k_scale, v_scale = self.pool.k_scale(layer), self.pool.v_scale(layer)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        # An FP8 pool's kernels read the stored values (converted to q's dtype in registers);
        # the key scale folds into the softmax scale, the value scale into the output.
        scale = self.scale * k_scale
        if self.is_decode:
            out = self.kernels.decode_attention(
                q,
                k_cache,
                v_cache,
                self.page_table,
                self.seq_lens,
                scale,
                out,
                num_splits=self.num_splits,
                workspace=self.workspace if self.num_splits > 1 else None,
                order=self._launch_order(q.shape[0]),
            )
        else:
            out = self.kernels.extend_attention(
                q,
                k_cache,
                v_cache,
                self.page_table,
                self.prefix_lens,
                self.query_starts,
                self.step_block_map,
                self.num_blocks,
                scale,
                out,
                tree_meta=self.tree[0] if self.tree else None,
                tree_bits=self.tree[1] if self.tree else None,
            )
        return out.mul_(v_scale) if v_scale != 1.0 else out


class TritonAttention(Attention):
    """Plugin `triton` (slot `attention`): paged attention with Triton kernels (a split-K
    decode kernel and a prefill/extend kernel over the page table).

    Needs Triton and a CUDA device; with `TRITON_INTERPRET=1` it also runs on CPU tensors in
    Triton's interpreter (slow; meant for tests). Selecting it where neither holds fails at
    setup with the reason."""

    Options: ClassVar[type[pydantic.BaseModel]] = TritonAttentionOptions

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the kernels cannot run here (no CUDA device, a missing package), or None."""
        try:
            _require_runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            return str(e)
        return None

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        """Fail early, with the reason, where the kernels cannot run."""
        _require_runtime(ctx.device)

    @hookimpl
    def attention_kernel(self, model: ModelInfo, pool: KVPool) -> AttentionBackend:
        _require_runtime(model.device)
        return TritonAttentionBackend(model, pool, decode_splits=self.options.decode_splits)


def _require_runtime(device: torch.device) -> None:
    """Raise a RuntimeError saying why the Triton kernels cannot run on `device`, if so."""
    if importlib.util.find_spec("triton") is None:
        raise RuntimeError(
            "the triton attention backend needs the `triton` package, which is not installed "
            "(pip install 'pegboard[gpu]' or pip install triton); choose --attention torch"
        )
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"the triton attention backend needs a CUDA device, and the model is on "
            f"{device.type}; set TRITON_INTERPRET=1 to run its kernels in Triton's CPU "
            "interpreter (slow, for tests), or choose --attention torch"
        )


def _tree_metadata(
    trees: list[torch.Tensor | None], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The extend kernel's tree inputs: int32 `[B, 3]` (the mask's rows `n` and columns `m`,
    its offset) and the masks as one flat int8 tensor; None when no request has a tree."""
    if all(t is None for t in trees):
        return None
    meta, bits = _tree_arrays(trees)
    return (
        torch.from_numpy(meta).to(device, non_blocking=True),
        bits.to(device, non_blocking=True),
    )


def _same_masks(a: list, b: list) -> bool:
    """The same mask objects (or None) in the same places: what `_tree_arrays` wrote is valid
    (nobody changes a mask once it is in a batch)."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))


def _tree_arrays(trees: list[torch.Tensor | None]) -> tuple[np.ndarray, torch.Tensor]:
    """`_tree_metadata`'s meta rows (host) and flat int8 bits (on the masks' device; empty
    without a tree)."""
    meta = np.zeros((len(trees), 3), dtype=np.int32)
    bits, offset = [], 0
    for b, tree in enumerate(trees):
        if tree is not None:
            meta[b] = (tree.shape[0], tree.shape[1], offset)
            bits.append(tree.reshape(-1).to(torch.int8))
            offset += tree.numel()
    return meta, torch.cat(bits) if bits else torch.zeros(0, dtype=torch.int8)


def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _pad_rows(rows: list[list[int]], width: int) -> np.ndarray:
    """int32 `[len(rows), width]`: each row's values, then zeros."""
    lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
    table = np.zeros((len(rows), width), dtype=np.int32)
    flat = np.fromiter(
        itertools.chain.from_iterable(rows), dtype=np.int32, count=int(lengths.sum())
    )
    table[np.arange(width) < lengths[:, None]] = flat
    return table


def _upload(dst: torch.Tensor, array: np.ndarray) -> None:
    """Copy a host array into `dst` in place; through pinned memory and asynchronously on CUDA
    (`pegboard.sdk.device.upload`)."""
    upload(array, dst)
