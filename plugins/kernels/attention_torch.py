"""The reference attention backend: paged attention in plain PyTorch, on any device.

Every step, `prepare` turns the batch's page tables into a padded gather index of KV slots
`[num_requests, max_seq_len]` and a boolean mask `[num_requests, 1, max_query_len, max_seq_len]`
(causal, offset by each request's cached prefix; a speculative draft tree's tokens see only
their ancestors among the tree). Each layer then writes its new k/v into the
pool, gathers every request's keys and values, and runs one batched
`scaled_dot_product_attention` on the padded tensors: prefill with a cached prefix, chunked
prefill and decode all take the same path.
"""

from __future__ import annotations

import torch
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.slots import Attention, AttentionBackend
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo
from torch.nn import functional as F


class TorchAttentionBackend(AttentionBackend):
    """Reference paged attention (`pegboard.sdk.AttentionBackend`), device-agnostic; reads
    an FP8 pool too (`supports_fp8_kv`)."""

    #: Reads and writes an FP8 KV pool (`--kv-cache-dtype fp8_e4m3`) with its per-layer scales.
    supports_fp8_kv = True
    #: Value layouts it reads (`KVPool.v_layout`): it indexes by (page, offset).
    v_layouts = ("nhd", "hdp")
    #: Applies `ForwardBatch.tree_masks` (speculative draft trees, verified in one forward).
    supports_tree_mask = True

    def __init__(self, model: ModelInfo, pool: KVPool, scale: float | None = None) -> None:
        super().__init__(model, pool, scale)
        self.batch: ForwardBatch | None = None
        self.kv_index: torch.Tensor | None = None  # [B, max_kv] flat KV slots (padded with 0)
        self.mask: torch.Tensor | None = None  # [B, 1, max_q, max_kv] True = may attend
        self.token_rows: torch.Tensor | None = None  # [T] row of each token in [B * max_q]
        self.max_q = 0

    def prepare(self, batch: ForwardBatch) -> None:
        """Build the step's gather index, mask and token placement (one small loop over
        requests, then a single copy of each index to the device)."""
        device = batch.input_ids.device
        page_size = self.pool.page_size
        query_lens = batch.query_lens_cpu
        seq_lens = batch.seq_lens_cpu
        max_q, max_kv = max(query_lens), max(seq_lens)
        offsets = torch.arange(page_size)
        kv_index = torch.zeros(len(seq_lens), max_kv, dtype=torch.int64)
        token_rows = []
        for b, (q_len, seq_len, pages) in enumerate(
            zip(query_lens, seq_lens, batch.page_tables_cpu)
        ):
            slots = (
                torch.tensor(pages, dtype=torch.int64)[:, None] * page_size + offsets
            ).flatten()
            kv_index[b, :seq_len] = slots[:seq_len]
            token_rows.append(torch.arange(b * max_q, b * max_q + q_len))
        self.kv_index = kv_index.to(device, non_blocking=True)
        self.token_rows = torch.cat(token_rows).to(device, non_blocking=True)
        mask = _causal_mask(query_lens, seq_lens, max_q, max_kv)
        if batch.tree_masks is not None:
            _apply_tree_masks(mask, batch.tree_masks, query_lens, seq_lens)
        self.mask = mask.to(device, non_blocking=True)
        self.max_q = max_q
        self.batch = batch

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Write `k`/`v` at the batch's slots, then attend over each request's whole sequence."""
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        slots = self.batch.slot_mapping
        if self.pool.is_fp8:
            keys, values = self._fp8_store_and_gather(layer, k, v, q.dtype)
        else:
            k_cache = self.pool.k[layer].view(-1, num_kv_heads, head_dim)
            v_cache = self.pool.v[layer].view(-1, num_kv_heads, head_dim)
            k_cache.index_copy_(0, slots, k.to(k_cache.dtype))
            v_cache.index_copy_(0, slots, v.to(v_cache.dtype))
            keys, values = k_cache[self.kv_index], v_cache[self.kv_index]

        num_requests = self.kv_index.shape[0]
        num_heads = q.shape[1]
        # [B, H, L, D] layouts for SDPA; padded query rows are computed and dropped.
        keys = keys.transpose(1, 2).to(q.dtype)
        values = values.transpose(1, 2).to(q.dtype)
        queries = q.new_zeros(num_requests * self.max_q, num_heads, head_dim)
        queries[self.token_rows] = q
        queries = queries.view(num_requests, self.max_q, num_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(
            queries,
            keys,
            values,
            attn_mask=self.mask,
            scale=self.scale,
            enable_gqa=num_heads != num_kv_heads,
        )
        out = out.transpose(1, 2).reshape(num_requests * self.max_q, num_heads, head_dim)
        return out[self.token_rows]

    def _fp8_store_and_gather(self, layer, k, v, dtype):
        """FP8 pool: store `value / scale` saturated to the type's range, read back times the
        scale. Indexing goes through byte views (CPU has no FP8 index ops), by (page, offset)
        so that values stored transposed per page (`KVPool.v_layout == "hdp"`) index alike."""
        page_size = self.pool.page_size
        slots, index = self.batch.slot_mapping, self.kv_index
        out = []
        for new, cache, scale in (
            (k, self.pool.k[layer], self.pool.k_scale(layer)),
            (v, self.pool.v[layer], self.pool.v_scale(layer)),
        ):
            finfo = torch.finfo(cache.dtype)
            stored = (new.float() / scale).clamp(finfo.min, finfo.max).to(cache.dtype)
            raw = cache.view(torch.uint8)
            raw[slots // page_size, slots % page_size] = stored.view(torch.uint8)
            gathered = raw[index // page_size, index % page_size]
            out.append(gathered.view(cache.dtype).to(dtype) * scale)
        return out[0], out[1]


def _causal_mask(
    query_lens: list[int], seq_lens: list[int], max_q: int, max_kv: int
) -> torch.Tensor:
    """`[B, 1, max_q, max_kv]`: query row `i` of a request with `c` cached tokens sees keys
    `0 .. c + i`. Padding rows see key 0 only, so SDPA never meets a fully masked row."""
    q_lens = torch.tensor(query_lens)[:, None]
    cached = torch.tensor(seq_lens)[:, None] - q_lens
    rows = torch.arange(max_q)[None, :]
    last_key = torch.where(rows < q_lens, cached + rows, 0)  # [B, max_q]
    return (torch.arange(max_kv)[None, None, :] <= last_key[:, :, None]).unsqueeze(1)


def _apply_tree_masks(
    mask: torch.Tensor, trees: list[torch.Tensor | None], query_lens: list[int], seq_lens: list[int]
) -> None:
    """Speculative draft trees (`ForwardBatch.tree_masks`): a request's last `n` query rows see
    the keys before its last `m`, then of those only what its `[n, m]` tree mask allows."""
    for b, tree in enumerate(trees):
        if tree is None:
            continue
        (n, m), q, s = tree.shape, query_lens[b], seq_lens[b]
        mask[b, 0, q - n : q, s - m : s] = tree


class TorchAttention(Attention):
    """Plugin `torch` (slot `attention`): the reference backend every other attention
    backend is compared against. Runs wherever PyTorch runs; not tuned for speed."""

    @hookimpl
    def attention_kernel(self, model: ModelInfo, pool: KVPool) -> AttentionBackend:
        return TorchAttentionBackend(model, pool)
