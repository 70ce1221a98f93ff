"""Rotary position embedding applied to q and k in place, optionally after a per-head RMSNorm.

One program per token loads the float32 cos/sin row of its position once and rotates every
query and key head of that token (the NeoX/HF rotate-half layout: the first and second halves
of a head are the pair's two coordinates), computing in float32 and rounding once. Writing in
place lets it work directly on the q/k views of the fused qkv projection's output.

With norm weights (Qwen3's `q_norm` / `k_norm`), each head is first RMS-normalised exactly as
the model's `RMSNorm` does it (float32, cast to the activation dtype, scaled, rounded), so the
fusion saves two kernels and a round trip of q and k through memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs


@triton.jit
def _rotate_heads(
    X,
    stride_h,
    cos,
    sin,
    NormWeight,
    eps,
    NUM_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    """Rotate the heads at `X` (`[NUM_HEADS, 2 * HALF]`, head stride `stride_h`) in place,
    after the per-head RMSNorm with `QK_NORM`; returns `(first halves, second halves, mask)`
    as stored (`[BLOCK_H, BLOCK_D]` tiles in X's dtype)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    first = X + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF, mask=mask, other=0.0).to(tl.float32)
    if QK_NORM:
        variance = (tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / (2 * HALF)
        rstd = tl.math.rsqrt(variance + eps)[:, None]
        w1 = tl.load(NormWeight + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        w2 = tl.load(NormWeight + HALF + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
        x1 = (x1 * rstd).to(X.dtype.element_ty).to(tl.float32) * w1[None, :]
        x2 = (x2 * rstd).to(X.dtype.element_ty).to(tl.float32) * w2[None, :]
        x1 = x1.to(X.dtype.element_ty).to(tl.float32)
        x2 = x2.to(X.dtype.element_ty).to(tl.float32)
    out1 = (x1 * cos[None, :] - x2 * sin[None, :]).to(X.dtype.element_ty)
    out2 = (x2 * cos[None, :] + x1 * sin[None, :]).to(X.dtype.element_ty)
    tl.store(first, out1, mask=mask)
    tl.store(first + HALF, out2, mask=mask)
    return out1, out2, mask


@triton.jit
def rotate_token(
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
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr,
):
    """Rotate token `token`'s q and k heads in place; returns its rotated k heads as stored,
    `(first halves, second halves, mask)` (`[BLOCK_HK, BLOCK_D]`, for `rotary_store`)."""
    position = tl.load(Positions + token)
    offs_d = tl.arange(0, BLOCK_D)
    # The tables repeat their first half (`cat(freqs, freqs)`): read it once.
    cos = tl.load(Cos + position * stride_table + offs_d, mask=offs_d < HALF, other=0.0)
    sin = tl.load(Sin + position * stride_table + offs_d, mask=offs_d < HALF, other=0.0)
    cos = cos.to(tl.float32)
    sin = sin.to(tl.float32)
    _rotate_heads(
        Q + token * stride_qt,
        stride_qh,
        cos,
        sin,
        QNormWeight,
        eps,
        NUM_Q_HEADS,
        HALF,
        BLOCK_HQ,
        BLOCK_D,
        QK_NORM,
    )
    return _rotate_heads(
        K + token * stride_kt,
        stride_kh,
        cos,
        sin,
        KNormWeight,
        eps,
        NUM_KV_HEADS,
        HALF,
        BLOCK_HK,
        BLOCK_D,
        QK_NORM,
    )


@triton.jit
def _rotary_kernel(
    Q,
    K,
    Positions,
    Cos,
    Sin,
    QNormWeight,
    KNormWeight,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QK_NORM: tl.constexpr,
    PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    wait_for_inputs(PDL)
    rotate_token(
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


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """Rotate `q [T, Hq, D]` and `k [T, Hkv, D]` in place by `positions [T]` (int64) with the
    float32 tables `cos`, `sin` (`[max_len, D]`, each row its half repeated). q and k may be
    strided views (of one qkv tensor) but each head must be contiguous. With both norm
    weights (`[D]`), RMS-normalise every head first (`eps`)."""
    num_tokens, num_q_heads, head_dim = q.shape
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("pass both q and k norm weights or neither")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rotary_embedding rotates in place: q and k heads must be contiguous")
    if num_tokens == 0:
        return
    half = head_dim // 2
    qk_norm = q_norm_weight is not None
    heads = q.shape[1] + k.shape[1]
    _rotary_kernel[(num_tokens,)](
        q,
        k,
        positions,
        cos,
        sin,
        q_norm_weight if qk_norm else cos,
        k_norm_weight if qk_norm else cos,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=k.shape[1],
        HALF=half,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_D=triton.next_power_of_2(half),
        QK_NORM=qk_norm,
        num_warps=4 if heads * head_dim >= 2048 else 1,
        **launch_options(q.device),
    )
