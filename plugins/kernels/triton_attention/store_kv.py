"""Store-KV kernel: write the step's new keys and values into their pool slots.

One program per new token copies that token's `[num_kv_heads, head_dim]` key and value into
the page and in-page offset its flat slot names (`slot = page * page_size + offset`), casting
to the pool's dtype. A negative slot marks a padding token (as a CUDA graph captured for a
larger batch has) and is skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.plugins.kernels.triton_attention.launch import unit_last_dim


@triton.jit
def _store_kv_kernel(
    K,
    V,
    K_cache,
    V_cache,
    Slots,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_kcp,
    stride_kcs,
    stride_kch,
    stride_vcp,
    stride_vcs,
    stride_vch,
    stride_vcd,
    k_inv_scale,
    v_inv_scale,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(Slots + token).to(tl.int64)
    page = slot // PAGE_SIZE
    offset = slot % PAGE_SIZE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    heads = tl.where(slot >= 0, NUM_KV_HEADS, 0)  # a padding token stores nothing
    mask = (offs_h[:, None] < heads) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(V + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if FP8_MAX > 0:  # an FP8 pool: divide by the layer's scale, saturate to the type's range
        k = tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -FP8_MAX), FP8_MAX)
    k_dst = K_cache + page * stride_kcp + offset * stride_kcs + offs_h[:, None] * stride_kch
    v_dst = V_cache + page * stride_vcp + offset * stride_vcs + offs_h[:, None] * stride_vch
    tl.store(k_dst + offs_d[None, :], k.to(K_cache.dtype.element_ty), mask=mask)
    tl.store(v_dst + offs_d[None, :] * stride_vcd, v.to(V_cache.dtype.element_ty), mask=mask)


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> None:
    """Write `k`, `v` (`[num_tokens, num_kv_heads, head_dim]`, last dim contiguous) into the
    paged caches (`[num_pages, page_size, num_kv_heads, head_dim]`; values may be stored
    transposed per page, `KVPool.v_layout == "hdp"`: every stride is read) at `slot_mapping`. An FP8
    cache stores `k / k_scale`, `v / v_scale`, saturated to the type's range."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = unit_last_dim(k), unit_last_dim(v)
    _store_kv_kernel[(num_tokens,)](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        v_cache.stride(3),
        1.0 / k_scale,
        1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim),
        FP8_MAX=torch.finfo(k_cache.dtype).max if k_cache.element_size() == 1 else 0.0,
        num_warps=1 if num_kv_heads * head_dim <= 512 else 4,
    )
