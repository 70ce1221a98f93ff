"""Paged extend (prefill) attention: new tokens over a cached prefix, causal per request.

The batch's new tokens are cut into query blocks: each block holds up to `tokens_per_block`
consecutive new tokens of one request, and `block_map` (built on the host once per step)
lists every block as (request, first token's index within the request's new tokens); a block
of request -1 is padding and does nothing (a CUDA graph fixes the grid: `padded_block_map`). One
program runs per (block, KV head). Its `BLOCK_M` query rows are the block's tokens times the
KV head's GQA group (row `r` is token `r // group`, query head `kv_head * group + r % group`),
so each key/value tile loaded through the page table serves every head of the group.

The program walks the keys in two phases, flash-attention style with an online softmax in
float32: first the keys every row of the block may see (the cached prefix and the request's
new tokens before the block), with only a bounds check; then the keys of the block's own
tokens, with the causal mask (query at position `p` sees keys `0 .. p`). The step's new keys
and values must already be in the pool (`store_kv` runs first), so both phases read one
paged source.

Speculative draft trees (`TREE`): a request's last `n` new tokens may carry an `[n, m]` mask
over its last `m` keys (int8, row-major, at `tree_meta[req, 2]` in `tree_bits`; `n`, `m` at
`tree_meta[req, 0:2]`, 0 for none) that further restricts which of those keys each of them
sees, in both phases (a tree longer than a query block reaches into the shared phase).
"""

from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl
from pegboard.plugins.kernels.triton_attention.decode import LOG2E, f16_dot, to_dot_dtype
from pegboard.plugins.kernels.triton_attention.launch import dot_precision, unit_last_dim


@triton.jit
def _attend_tile(
    q,
    acc,
    m_i,
    l_i,
    tile,
    limit,
    q_pos,
    pages_row,
    K_cache,
    V_cache,
    kv_head,
    qk_scale,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    offs_n,
    offs_d,
    d_mask,
    tree_bits,
    tree_q,
    tree_k,
    tree_n,
    tree_m,
    CAUSAL: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    TREE: tl.constexpr,
):
    """One online-softmax update of `acc`, `m_i`, `l_i` with keys `tile .. tile + BLOCK_N`
    below `limit` (and, when `CAUSAL`, at most each row's position; with `TREE`, where both
    the row and the key are in the request's tree mask, only the key's bit in the row's)."""
    toks = tile + offs_n
    n_mask = toks < limit
    pages = tl.load(pages_row + toks // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
    in_page = toks % PAGE_SIZE
    kv_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(
        K_cache
        + pages[:, None] * stride_kp
        + in_page[:, None] * stride_ks
        + kv_head * stride_kh
        + offs_d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V_cache
        + pages[:, None] * stride_vp
        + in_page[:, None] * stride_vs
        + kv_head * stride_vh
        + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
    visible = n_mask[None, :]
    if CAUSAL:
        visible = visible & (toks[None, :] <= q_pos[:, None])
    if TREE:
        q_rel = q_pos - tree_q
        k_rel = toks - tree_k
        in_tree = (
            (q_rel[:, None] >= 0)
            & (q_rel[:, None] < tree_n)
            & (k_rel[None, :] >= 0)
            & n_mask[None, :]
        )
        bits = tl.load(tree_bits + q_rel[:, None] * tree_m + k_rel[None, :], mask=in_tree, other=1)
        visible = visible & (bits != 0)
    qk = tl.where(visible, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(qk - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
    return acc, m_new, l_i


@triton.jit
def _extend_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    Page_table,
    Prefix_lens,
    Query_starts,
    Block_map,
    Tree_meta,
    Tree_bits,
    qk_scale,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_kp,
    stride_ks,
    stride_kh,
    stride_vp,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_pt,
    GROUP: tl.constexpr,
    TOKENS_PER_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    TREE: tl.constexpr,
    F16_DOT: tl.constexpr,
):
    block = tl.program_id(0)
    kv_head = tl.program_id(1)
    req = tl.load(Block_map + 2 * block)
    first = tl.load(Block_map + 2 * block + 1)
    real = req >= 0  # request -1: a padding block (a mixed CUDA graph's grid), no work
    req = tl.maximum(req, 0)
    q_start = tl.load(Query_starts + req)
    q_len = tl.where(real, tl.load(Query_starts + req + 1) - q_start, 0)
    prefix = tl.where(real, tl.load(Prefix_lens + req), 0)
    seq_len = prefix + q_len
    tree_n = 0
    tree_m = 0
    tree_bits = Tree_bits
    if TREE:
        tree_n = tl.load(Tree_meta + 3 * req)
        tree_m = tl.load(Tree_meta + 3 * req + 1)
        tree_bits = Tree_bits + tl.load(Tree_meta + 3 * req + 2).to(tl.int64)
    tree_q = seq_len - tree_n  # the first query and key positions the mask covers
    tree_k = seq_len - tree_m

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < HEAD_DIM
    row_tok = first + offs_m // GROUP
    row_head = kv_head * GROUP + offs_m % GROUP
    row_mask = (offs_m < TOKENS_PER_BLOCK * GROUP) & (row_tok < q_len)
    q_pos = prefix + row_tok
    token_rows = (q_start + row_tok).to(tl.int64)
    q = tl.load(
        Q + token_rows[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    q = to_dot_dtype(q, F16_DOT)
    pages_row = Page_table + req.to(tl.int64) * stride_pt
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    shared_end = prefix + first  # keys below this are visible to every row of the block
    block_end = tl.minimum(prefix + first + TOKENS_PER_BLOCK, seq_len)
    for tile in range(0, shared_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, tile, shared_end, q_pos, pages_row, K_cache, V_cache, kv_head,
            qk_scale, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_vd,
            offs_n, offs_d, d_mask, tree_bits, tree_q, tree_k, tree_n, tree_m, CAUSAL=False,
            PAGE_SIZE=PAGE_SIZE, PRECISION=PRECISION, TREE=TREE,
        )  # fmt: skip
    for tile in range(shared_end, block_end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            q, acc, m_i, l_i, tile, block_end, q_pos, pages_row, K_cache, V_cache, kv_head,
            qk_scale, stride_kp, stride_ks, stride_kh, stride_vp, stride_vs, stride_vh, stride_vd,
            offs_n, offs_d, d_mask, tree_bits, tree_q, tree_k, tree_n, tree_m, CAUSAL=True,
            PAGE_SIZE=PAGE_SIZE, PRECISION=PRECISION, TREE=TREE,
        )  # fmt: skip

    out = acc / l_i[:, None]
    tl.store(
        Out + token_rows[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=row_mask[:, None] & d_mask[None, :],
    )


def extend_block_m(group: int) -> int:
    """Query rows per program: 64, or the GQA group rounded up to a power of two if larger."""
    return max(64, triton.next_power_of_2(group))


def tokens_per_block(group: int, block_m: int | None = None) -> int:
    """New tokens one extend program covers: as many whole GQA groups as fit in `block_m`."""
    return (block_m or extend_block_m(group)) // group


def build_block_map(query_lens: np.ndarray, tokens_per_block: int) -> np.ndarray:
    """int32 `[num_blocks, 2]`: (request, first new token of the block) for every query
    block, requests in batch order."""
    query_lens = np.asarray(query_lens, dtype=np.int64)
    blocks = -(-query_lens // tokens_per_block)
    total = int(blocks.sum())
    block_map = np.empty((total, 2), dtype=np.int32)
    block_map[:, 0] = np.repeat(np.arange(len(query_lens)), blocks)
    first_block = np.repeat(np.cumsum(blocks) - blocks, blocks)
    block_map[:, 1] = (np.arange(total) - first_block) * tokens_per_block
    return block_map


def max_blocks(num_tokens: int, max_requests: int, tokens_per_block: int) -> int:
    """The most query blocks any batch of `num_tokens` new tokens over at most `max_requests`
    requests can have: each request leaves at most one block partly filled."""
    requests = min(num_tokens, max_requests)
    return (num_tokens - requests) // tokens_per_block + requests


def padded_block_map(block_map: np.ndarray, num_blocks: int) -> np.ndarray:
    """`block_map` followed by padding blocks (request -1) up to `num_blocks` rows, so the
    kernel's grid depends only on `num_blocks` (a mixed CUDA graph's, `max_blocks`)."""
    padded = np.zeros((num_blocks, 2), dtype=np.int32)
    padded[: len(block_map)] = block_map
    padded[len(block_map) :, 0] = -1
    return padded


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    prefix_lens: torch.Tensor,
    query_starts: torch.Tensor,
    block_map: torch.Tensor,
    num_blocks: int,
    scale: float,
    out: torch.Tensor,
    block_m: int | None = None,
    block_n: int = 32,
    num_warps: int = 4,
    num_stages: int = 3,
    tree_meta: torch.Tensor | None = None,
    tree_bits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every new token over its request's cached prefix and the new
    tokens up to itself; returns `out`.

    `q`, `out`: `[num_tokens, num_heads, head_dim]`, requests' tokens concatenated in order;
    `k_cache`, `v_cache`: `[num_pages, page_size, num_kv_heads, head_dim]` already holding the
    new tokens' keys and values; `page_table`: int32 `[>= B, >= max pages]`; `prefix_lens`: int32
    `[>= B]`, each request's cached tokens before this step; `query_starts`: int32 `[>= B + 1]`, the cumulative
    new-token counts (cu_seqlens); `block_map`: int32 `[>= num_blocks, 2]` from
    `build_block_map` with `tokens_per_block(group, block_m)`. The default tiles (64 query
    rows, 32 keys, 4 warps, 3 stages) were the fastest of a sweep on the H100 at head size 128.
    Draft trees: `tree_meta` int32 `[>= B, 3]` (each request's mask rows and columns, its
    offset) and `tree_bits` int8 (the masks, see the module docstring).
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_blocks == 0:
        return out
    q = unit_last_dim(q)
    block_m = block_m or extend_block_m(group)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _extend_kernel[(num_blocks, num_kv_heads)](
        q,
        k_cache,
        v_cache,
        out,
        page_table,
        prefix_lens,
        query_starts,
        block_map,
        tree_meta if tree_meta is not None else block_map,
        tree_bits if tree_bits is not None else block_map,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        page_table.stride(0),
        GROUP=group,
        TOKENS_PER_BLOCK=block_m // group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype),
        TREE=tree_meta is not None,
        F16_DOT=f16_dot(q.dtype, k_cache, None),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out
