"""Paged decode attention (one new token per request), flash-decoding style.

`_decode_kernel` runs one program per (request, KV head, split). The program loads the query
rows of every query head in the KV head's GQA group at once (`[BLOCK_H, head_dim]`), so one
load of each key/value tile serves the whole group. It walks its share of the request's KV
length in tiles of `BLOCK_N` tokens, finding each token's page through the request's row of
the page-table matrix, and keeps an online softmax in float32 (base-2 exponentials, the scale
folded into the logits).

With one split the program writes the normalised output. With several, each split covers a
contiguous range of `ceil(seq_len / num_splits)` tokens (rounded up to whole tiles), writes its
partial output and log-sum-exp to a float32 workspace, and `_decode_reduce_kernel` (one program
per request and query head) merges the splits. Splitting keeps the GPU busy when there are few
requests and long contexts. Splits past a short request's end do no work and report an empty
log-sum-exp.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from pegboard.plugins.kernels.triton_attention.launch import dot_precision, num_sms, unit_last_dim

LOG2E = math.log2(math.e)
F16_MAX = 65504.0
#: How the decode kernel multiplies over an FP8 cache: "dot" (tensor cores, float16) or "fma"
#: (CUDA cores). Not yet measured against each other on the GPU (`scripts/bench_kv_fp8.py
#: --kernels` times both); `PEGBOARD_FP8_DECODE` overrides.
FP8_DECODE = os.environ.get("PEGBOARD_FP8_DECODE", "dot")
#: Float16 dots over an FP8 cache (`to_dot_dtype`): opt-in (`PEGBOARD_FP8_F16_DOT=1`) until it
#: passes on the GPU — the GPU test of the FP8 Triton path failed with it on (2026-11-30,
#: H200, cause not yet read), and passes with the 16-bit-query dots used before.
FP8_F16_DOT = os.environ.get("PEGBOARD_FP8_F16_DOT", "0") == "1"


@triton.jit
def to_dot_dtype(q, F16_DOT: tl.constexpr):
    """The query in the dtype the dots run in: as loaded, or with `F16_DOT` (an FP8 KV cache)
    float16, which e4m3 keys and values convert to in one instruction per pair (sm_89+; to
    bf16 it takes three) and which holds every e4m3 and bf16 value in its range exactly
    (saturated at float16's largest)."""
    if F16_DOT:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -F16_MAX), F16_MAX).to(tl.float16)
    return q


def f16_dot(q_dtype: torch.dtype, k_cache: torch.Tensor, f16: bool | None) -> bool:
    """Whether the kernels run their dots in float16 (see `to_dot_dtype`): `f16`, or by default
    (with `FP8_F16_DOT`) for a one-byte (FP8) cache under 16-bit queries."""
    if f16 is not None:
        return f16
    fp8 = k_cache.element_size() == 1 and q_dtype in (torch.bfloat16, torch.float16)
    return FP8_F16_DOT and fp8


@triton.jit
def _decode_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    Mid_out,
    Mid_lse,
    Page_table,
    Seq_lens,
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
    stride_pt,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    F16_DOT: tl.constexpr,
    FMA: tl.constexpr,
):
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(Seq_lens + req)
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < GROUP
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        Q + req * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=h_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FMA:
        q = q.to(tl.float32)
    else:
        q = to_dot_dtype(q, F16_DOT)
    pages_row = Page_table + req.to(tl.int64) * stride_pt
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        toks = tile + offs_n
        n_mask = toks < end
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
            + offs_d[None, :],
            mask=kv_mask,
            other=0.0,
        )
        if FMA:  # CUDA cores: [BLOCK_H, BLOCK_N, BLOCK_D] products, reduced over D
            qk = tl.sum(q[:, None, :] * k.to(tl.float32)[None, :, :], axis=2) * qk_scale
        else:
            qk = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=PRECISION) * qk_scale
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if FMA:
            pv = tl.sum(p[:, :, None] * v.to(tl.float32)[None, :, :], axis=1)
        else:
            pv = tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=PRECISION)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    out_mask = h_mask[:, None] & d_mask[None, :]
    if NUM_SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(
            Out + req * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=out_mask,
        )
    else:
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        mid = req.to(tl.int64) * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(Mid_out + mid[:, None] + offs_d[None, :], out, mask=out_mask)
        tl.store(
            Mid_lse + req.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=h_mask
        )


@triton.jit
def _decode_reduce_kernel(
    Out,
    Mid_out,
    Mid_lse,
    stride_ot,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    base = req.to(tl.int64) * stride_mb + head * stride_mh + offs_s * stride_ms
    lse_row = Mid_lse + req.to(tl.int64) * stride_lb + head * stride_lh
    lse = tl.load(lse_row + offs_s, mask=s_mask, other=float("-inf"))
    weights = tl.exp2(lse - tl.max(lse, 0))
    parts = tl.load(
        Mid_out + base[:, None] + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    out = tl.sum(weights[:, None] * parts, 0) / tl.sum(weights, 0)
    tl.store(
        Out + req * stride_ot + head * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


def choose_num_splits(
    num_requests: int, num_kv_heads: int, max_seq_len: int, device: torch.device, block_n: int
) -> int:
    """Splits per request so that about two programs per SM run, but never so many that a
    split gets fewer than two tiles of keys, and at most 16. (On the H100, 64 requests x 8 KV
    heads ran fastest unsplit, one request of 8192 tokens with 16 splits: docs/benchmarks.md.)"""
    programs = num_requests * num_kv_heads
    wanted = triton.cdiv(2 * num_sms(device), max(programs, 1))
    useful = triton.cdiv(max_seq_len, 2 * block_n)
    return max(1, min(wanted, useful, 16))


def decode_block_n(head_dim: int) -> int:
    """Keys per tile of the decode kernel: 64 (32 for head sizes above 128)."""
    return 64 if head_dim <= 128 else 32


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    num_splits: int = 1,
    workspace: tuple[torch.Tensor, torch.Tensor] | None = None,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
    f16: bool | None = None,
    fma: bool | None = None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged KV; returns `out`.

    `q`, `out`: `[num_requests, num_heads, head_dim]` (request `i`'s token is row `i`);
    `k_cache`, `v_cache`: `[num_pages, page_size, num_kv_heads, head_dim]`;
    `page_table`: int32 `[>= num_requests, >= max pages]`, row `i` lists request `i`'s pages;
    `seq_lens`: int32 `[>= num_requests]`, keys each request attends to (its new one included).
    With `num_splits > 1`, `workspace` holds float32 partial outputs
    `[>= num_requests, num_heads, num_splits, head_dim]` and log-sum-exps
    `[>= num_requests, num_heads, num_splits]` (allocated here when None). `f16`: run the
    dots in float16 (default: for an FP8 cache, see `to_dot_dtype`). `fma`: CUDA-core products
    instead of tensor-core dots, the GQA group not padded to 16 rows (default: `FP8_DECODE`
    for an FP8 cache with a group of at most 8, else off).
    """
    num_requests, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_requests == 0:
        return out
    if fma is None:
        fma = FP8_DECODE == "fma" and k_cache.element_size() == 1 and group <= 8
    block_h = triton.next_power_of_2(group) if fma else max(16, triton.next_power_of_2(group))
    q = unit_last_dim(q)
    block_n = block_n or decode_block_n(head_dim)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if fma:  # the [BLOCK_H, BLOCK_N, BLOCK_D] products live in registers: ~64 per thread
        block_n = max(16, min(block_n, 8192 // (block_h * block_d)))
    if num_splits > 1 and workspace is None:
        workspace = decode_workspace(num_requests, num_heads, num_splits, head_dim, q.device)
    mid_out, mid_lse = workspace if num_splits > 1 else (out, out)
    _decode_kernel[(num_requests, num_kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        out,
        mid_out,
        mid_lse,
        page_table,
        seq_lens,
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
        page_table.stride(0),
        mid_out.stride(0) if num_splits > 1 else 0,
        mid_out.stride(1) if num_splits > 1 else 0,
        mid_out.stride(2) if num_splits > 1 else 0,
        mid_lse.stride(0) if num_splits > 1 else 0,
        mid_lse.stride(1) if num_splits > 1 else 0,
        GROUP=group,
        HEAD_DIM=head_dim,
        PAGE_SIZE=k_cache.shape[1],
        NUM_SPLITS=num_splits,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        PRECISION=dot_precision(q.dtype),
        F16_DOT=f16_dot(q.dtype, k_cache, f16),
        FMA=fma,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_requests, num_heads)](
            out,
            mid_out,
            mid_lse,
            out.stride(0),
            out.stride(1),
            mid_out.stride(0),
            mid_out.stride(1),
            mid_out.stride(2),
            mid_lse.stride(0),
            mid_lse.stride(1),
            HEAD_DIM=head_dim,
            NUM_SPLITS=num_splits,
            BLOCK_S=triton.next_power_of_2(num_splits),
            BLOCK_D=block_d,
            num_warps=4 if head_dim >= 128 else 2,
        )
    return out


def decode_workspace(
    num_requests: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 split workspace `decode_attention` expects: partial outputs and their
    log-sum-exps (base 2)."""
    mid_out = torch.empty(
        num_requests, num_heads, num_splits, head_dim, dtype=torch.float32, device=device
    )
    mid_lse = torch.empty(num_requests, num_heads, num_splits, dtype=torch.float32, device=device)
    return mid_out, mid_lse
