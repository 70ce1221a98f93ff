"""Rope and the KV store in one kernel: rotate q and k, write the rotated k and v into the pool.

At batch 1 each layer otherwise runs rope (q/k in place, `rotary`) and then the attention
backend's store kernel (k/v copied into their pool slot), two small launches whose cost is
mostly launch latency (the store launches without PDL, so nothing of it overlaps). One program
per token here loads its position's cos/sin row, rotates the q heads in place (the bits of
`rotary.rotary_embedding`, with Qwen3's per-head norm when given), rotates the k heads, stores
them in place too and into the paged cache at the token's slot, and copies v there: the same
bytes `rotary_embedding` followed by the `triton` backend's `store_kv` write (an FP8 pool
stores `k / k_scale`, `v / v_scale` saturated, from the rounded k and v as `store_kv` does).

The pool layout is `[num_pages, page_size, num_kv_heads, head_dim]`, `slot = page *
page_size + offset`; a negative slot (a padding row of a CUDA graph) stores nothing in the pool.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs
from pegboard.core.kernels.rotary import rotate_token


@triton.jit
def _to_pool(x, inv_scale, Cache, FP8_MAX: tl.constexpr):
    """`x` (already rounded to the activation dtype) as the pool stores it (`store_kv`)."""
    if FP8_MAX > 0:
        x = tl.minimum(tl.maximum(x.to(tl.float32) * inv_scale, -FP8_MAX), FP8_MAX)
    return x.to(Cache.dtype.element_ty)


@triton.jit
def _rotary_store_kernel(
    Q,
    K,
    V,
    Positions,
    Cos,
    Sin,
    QNormWeight,
    KNormWeight,
    K_cache,
    V_cache,
    Slots,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_table,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_vcp,
    stride_vcs,
    stride_vch,
    stride_vcd,
    k_inv_scale,
    v_inv_scale,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    wait_for_inputs(PDL)
    k1, k2, _ = rotate_token(
        Q,
        K,
        Positions,
        Cos,
        Sin,
        QNormWeight,
        KNormWeight,
        token,
        stride_qt,
        stride_qh,
        stride_kt,
        stride_kh,
        stride_table,
        eps,
        NUM_Q_HEADS,
        NUM_KV_HEADS,
        HALF,
        BLOCK_HQ,
        BLOCK_HK,
        BLOCK_D,
        QK_NORM,
    )
    offs_h = tl.arange(0, BLOCK_HK)
    offs_d = tl.arange(0, BLOCK_D)
    slot = tl.load(Slots + token).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # a padding token stores nothing
    pool_mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HALF)
    k_dst = K_cache + page * stride_kcp + offset * stride_kcs + offs_h[:, None] * stride_kch
    k_dst += offs_d[None, :]
    tl.store(k_dst, _to_pool(k1, k_inv_scale, K_cache, FP8_MAX), mask=pool_mask)
    tl.store(k_dst + HALF, _to_pool(k2, k_inv_scale, K_cache, FP8_MAX), mask=pool_mask)
    # v: both halves as one row of the head (HALF need not be a power of two)
    offs_v = tl.arange(0, 2 * BLOCK_D)
    v_mask = (offs_h[:, None] < heads) & (offs_v[None, :] < 2 * HALF)
    v = tl.load(V + token * stride_vt + offs_h[:, None] * stride_vh + offs_v[None, :], mask=v_mask)
    v_dst = V_cache + page * stride_vcp + offset * stride_vcs + offs_h[:, None] * stride_vch
    tl.store(
        v_dst + offs_v[None, :] * stride_vcd,
        _to_pool(v, v_inv_scale, V_cache, FP8_MAX),
        mask=v_mask,
    )


def rotary_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """`rotary.rotary_embedding(positions, q, k, cos, sin, q_norm_weight, k_norm_weight, eps)`
    (q and k rotated in place), then the rotated `k` and `v` (`[T, Hkv, D]`) written into the
    paged caches (`[num_pages, page_size, Hkv, D]`, the values possibly a view of pages stored
    `[Hkv, D, page_size]`: every stride is read) at `slot_mapping [T]` (negative: not stored),
    an FP8 cache getting `k / k_scale`, `v / v_scale` saturated: what `rotary_embedding`
    and the `triton` attention backend's `store_kv` write, in one launch. q, k, v may be strided
    views (of one qkv tensor) but each head must be contiguous."""
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q and k norm weights or neither")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        raise ValueError("rotary_store_kv: the heads of q, k and v must be contiguous")
    if k_cache.shape[2:] != (num_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"rotary_store_kv: caches {tuple(k_cache.shape)} / {tuple(v_cache.shape)} do not hold "
            f"{num_kv_heads} KV heads of {head_dim}"
        )
    if num_tokens == 0:
        return
    half = head_dim // 2
    qk_norm = q_norm_weight is not None
    heads = num_q_heads + num_kv_heads
    _rotary_store_kernel[(num_tokens,)](
        q,
        k,
        v,
        positions,
        cos,
        sin,
        q_norm_weight if qk_norm else cos,
        k_norm_weight if qk_norm else cos,
        k_cache,
        v_cache,
        slot_mapping,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cos.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),  # (values transposed per page, `KVPool.v_layout == "hdp"`: not 1)
        1.0 / k_scale,
        1.0 / v_scale,
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(half),
        QK_NORM=qk_norm,
        PAGE_SIZE=k_cache.shape[1],
        FP8_MAX=torch.finfo(k_cache.dtype).max if k_cache.element_size() == 1 else 0.0,
        num_warps=4 if heads * head_dim >= 2048 else 1,
        **launch_options(q.device),
    )
