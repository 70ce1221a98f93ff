"""Paged decode attention (one new token per request), flash-decoding style.

`_decode_kernel` runs one program per (request, block of KV heads, split). The program loads
the query rows of every query head of its KV heads at once, so one load of each key/value tile
serves the whole GQA group. It walks its share of the request's KV length in tiles of
`BLOCK_N` tokens, finding each token's page through the request's row of the page-table
matrix, and keeps an online softmax in float32 (base-2 exponentials, the scale folded into the
logits). With several KV heads per program (`HEADS`), a tile's key rows hold all of them (one
contiguous run of `HEADS * head_dim` per token) and each query row is non-zero only in its own
head's columns, so one dot still gives every row its own head's logits.

With one split the program writes the normalised output. With several, each split covers a
contiguous range of `ceil(seq_len / num_splits)` tokens (rounded up to whole tiles, and at
least `MIN_CHUNK`), writes its partial output and log-sum-exp to a float32 workspace, and
`_decode_reduce_kernel` (one program per request and query head) merges the splits that hold
keys. Splitting keeps the GPU busy when there are few requests and long contexts. Splits past
a short request's end do no work and write nothing. With `DecodeConfig.fixup` the last split of
each (request, KV heads) to finish merges them instead (`_merge_splits`, the reduce kernel's
code), counted in the workspace's counters: one launch instead of two.

How a launch is shaped (tile, warps, stages, heads per program, grid order, page prefetch,
split scheme) is a `DecodeConfig` (`decode_configs.py`): named variants, and a table of which
one the engine runs per batch size."""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs
from pegboard.plugins.kernels.triton_attention.decode_configs import (
    DECODE_VARIANTS,
    MAX_SPLITS,
    DecodeConfig,
    decode_config,
    heads_per_program,
)
from pegboard.plugins.kernels.triton_attention.decode_fp8mma import (
    decode_fp8mma,
    uses_fp8_mma,
    values_transposed,
)
from pegboard.plugins.kernels.triton_attention.launch import dot_precision, num_sms, unit_last_dim

LOG2E = math.log2(math.e)
F16_MAX = tl.constexpr(65504.0)  # (a plain float global does not compile for the GPU)
#: How the decode kernel multiplies over an FP8 cache: "dot" (tensor cores, float16) or "fma"
#: (CUDA cores). Not yet measured against each other on the GPU (`scripts/bench_kv_fp8.py
#: --kernels` times both); `PEGBOARD_FP8_DECODE` overrides.
FP8_DECODE = os.environ.get("PEGBOARD_FP8_DECODE", "dot")
#: Float16 dots over an FP8 cache (`to_dot_dtype`): opt-in (`PEGBOARD_FP8_F16_DOT=1`) until it
#: passes on the GPU — the GPU test of the FP8 Triton path failed with it on (2026-11-30,
#: H200). Likely cause, found compiling for sm_90 on a CPU: `F16_MAX` was a plain float
#: global, which `@triton.jit` refuses when compiling (the interpreter allows it); it is a
#: `tl.constexpr` now. The decode variants `f16` / `s3-fast-f16` run these dots in the sweep.
FP8_F16_DOT = os.environ.get("PEGBOARD_FP8_F16_DOT", "0") == "1"
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
#: Decode launches of at least this many requests start their programs longest request first
#: (`launch_order`; the H200, nano-vllm batch: 5 % less per call, docs/kernels.md "Launch
#: order"); `PEGBOARD_DECODE_ORDER=0` launches in row order.
ORDER_MIN_REQUESTS = 32
DECODE_ORDER = os.environ.get("PEGBOARD_DECODE_ORDER", "1") != "0"


@triton.jit
def to_dot_dtype(q, F16_DOT: tl.constexpr):
    """The query in the dtype the dots run in: as loaded, or with `F16_DOT` (an FP8 KV cache)
    float16, which e4m3 keys and values convert to in one instruction per pair (sm_89+; to
    bf16 it takes three) and which holds every e4m3 and bf16 value in its range exactly
    (saturated at float16's largest)."""
    if F16_DOT:
        q = tl.minimum(tl.maximum(q.to(tl.float32), -F16_MAX), F16_MAX).to(tl.float16)
    return q


@triton.jit
def e4m3_to_f16(x, ASM: tl.constexpr):
    """An e4m3 tile as float16, converted where it stands. With `ASM`: inline PTX
    (`cvt.rn.f16x2.e4m3x2`, four values per instance), marked impure so that Triton does not
    move it past the layout conversion to the dots' operands (a plain cast, or a pure asm, is
    moved there: the value tile's transpose then gathers single bytes, `ld.shared.b8` and
    `prmt`, while a float16 tile takes `ldmatrix.trans`); see docs/kernels.md, "Decode
    variants". The interpreter cannot run inline assembly: without `ASM`, the plain cast."""
    if ASM:
        return tl.inline_asm_elementwise(
            "{ .reg .b16 lo, hi; mov.b32 {lo, hi}, $2; "
            "cvt.rn.f16x2.e4m3x2 $0, lo; cvt.rn.f16x2.e4m3x2 $1, hi; }",
            "=r,=r,r",
            [x.to(tl.int8, bitcast=True)],
            dtype=tl.float16,
            is_pure=False,
            pack=4,
        )
    return x.to(tl.float16)


def f16_dot(q_dtype: torch.dtype, k_cache: torch.Tensor, f16: bool | None) -> bool:
    """Whether the kernels run their dots in float16 (see `to_dot_dtype`): `f16`, or by default
    (with `FP8_F16_DOT`) for a one-byte (FP8) cache under 16-bit queries."""
    return _f16_dot(q_dtype, k_cache.element_size() == 1, f16)


def _f16_dot(q_dtype: torch.dtype, fp8: bool, f16: bool | None) -> bool:
    if f16 is not None:
        return f16
    return FP8_F16_DOT and fp8 and q_dtype in (torch.bfloat16, torch.float16)


@triton.jit
def _split_chunk(seq_len, num_splits, MIN_CHUNK: tl.constexpr, BLOCK_N: tl.constexpr):
    """Keys per split of a request of `seq_len` keys: `ceil(seq_len / num_splits)` rounded up
    to whole tiles, and at least `MIN_CHUNK` (which the launcher keeps >= `BLOCK_N`, so a
    request without keys gets a non-zero chunk too)."""
    return tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, MIN_CHUNK)


# `num_splits` sets each split's key range and the fix-up's count (no address arithmetic): not
# specialized on, so that the split counts of a batch are one key, not three (1, 16, other).
@triton.jit(do_not_specialize=["num_splits"])
def _decode_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    Mid_out,
    Mid_lse,
    Page_table,
    Seq_lens,
    Counters,
    Order,
    qk_scale,
    num_splits,
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
    SPLIT: tl.constexpr,
    MIN_CHUNK: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_FASTEST: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    F16_DOT: tl.constexpr,
    FMA: tl.constexpr,
    CVT: tl.constexpr = 0,
    FIXUP: tl.constexpr = False,
    BLOCK_S: tl.constexpr = 1,
    PDL: tl.constexpr = False,
    ORDERED: tl.constexpr = False,
):
    if HEAD_FASTEST:
        head_block = tl.program_id(0)
        req = tl.program_id(1)
        head_blocks = tl.num_programs(0)
    else:
        req = tl.program_id(0)
        head_block = tl.program_id(1)
        head_blocks = tl.num_programs(1)
    split = tl.program_id(2)
    wait_for_inputs(PDL)  # q comes from the kernel before (rope)
    if ORDERED:  # launch order: the longest requests' programs first (`decode_attention`)
        req = tl.load(Order + req).to(tl.int32)
    seq_len = tl.load(Seq_lens + req)
    if SPLIT:
        chunk = _split_chunk(seq_len, num_splits, MIN_CHUNK, BLOCK_N)
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
    else:
        start = 0
        end = seq_len
    kv_head0 = head_block * HEADS

    # Rows: the query heads of the program's KV heads (row r: KV head r // GROUP). Columns:
    # HEADS * BLOCK_D, head c // BLOCK_D's dimension c % BLOCK_D; each row's query sits in its
    # KV head's columns only, so one dot over a key row of all the heads gives every row's
    # logits against its own head (with HEADS == 1: the plain [group, head_dim] query).
    offs_h = tl.arange(0, BLOCK_H)
    offs_n = tl.arange(0, BLOCK_N)
    offs_c = tl.arange(0, HEADS * BLOCK_D)
    if HEADS == 1:
        col_head = tl.zeros([BLOCK_D], dtype=tl.int32)
        offs_d = offs_c
    else:
        col_head = offs_c // BLOCK_D
        offs_d = offs_c % BLOCK_D
    heads = kv_head0 * GROUP + offs_h
    h_mask = offs_h < tl.where(start < end, GROUP * HEADS, 0)  # an empty split writes nothing
    d_mask = offs_d < HEAD_DIM
    rc_mask = h_mask[:, None] & d_mask[None, :] & ((offs_h // GROUP)[:, None] == col_head[None, :])
    q = tl.load(
        Q + req * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=rc_mask,
        other=0.0,
    )
    if FMA:
        q = q.to(tl.float32)
    else:
        q = to_dot_dtype(q, F16_DOT)
    k_cols = (kv_head0 + col_head)[None, :] * stride_kh + offs_d[None, :]
    v_cols = (kv_head0 + col_head)[None, :] * stride_vh + offs_d[None, :]
    pages_row = Page_table + req.to(tl.int64) * stride_pt
    if PREFETCH:  # the first tile's page ids; each iteration loads the next tile's
        first = start + offs_n
        pages = tl.load(pages_row + first // PAGE_SIZE, mask=first < end, other=0).to(tl.int64)
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, HEADS * BLOCK_D], dtype=tl.float32)
    for tile in range(start, end, BLOCK_N):
        toks = tile + offs_n
        n_mask = toks < end
        if not PREFETCH:
            pages = tl.load(pages_row + toks // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        rows = pages * stride_kp + (toks % PAGE_SIZE) * stride_ks
        kv_mask = n_mask[:, None] & d_mask[None, :]
        k = tl.load(K_cache + rows[:, None] + k_cols, mask=kv_mask, other=0.0)
        v_rows = pages * stride_vp + (toks % PAGE_SIZE) * stride_vs
        v = tl.load(V_cache + v_rows[:, None] + v_cols, mask=kv_mask, other=0.0)
        if CVT:  # e4m3 -> float16 here, before the dots' layouts (see `e4m3_to_f16`)
            k = e4m3_to_f16(k, CVT == 2)
            v = e4m3_to_f16(v, CVT == 2)
        if PREFETCH:
            nxt = toks + BLOCK_N
            pages = tl.load(pages_row + nxt // PAGE_SIZE, mask=nxt < end, other=0).to(tl.int64)
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

    # Each row's output: its KV head's columns of `acc` (the others hold other heads' values).
    if not SPLIT:
        out = acc / l_i[:, None]
        tl.store(
            Out + req * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(Out.dtype.element_ty),
            mask=rc_mask,
        )
    else:
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        mid = req.to(tl.int64) * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(Mid_out + mid[:, None] + offs_d[None, :], out, mask=rc_mask)
        tl.store(
            Mid_lse + req.to(tl.int64) * stride_lb + heads * stride_lh + split,
            lse,
            mask=h_mask,
        )
        if FIXUP:  # the last split of (request, KV heads) to finish merges them: no reduce launch
            counter = Counters + req * head_blocks + head_block
            tl.debug_barrier()  # every thread's partial outputs written before the release below
            arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                used = tl.cdiv(seq_len, chunk)
                for r in tl.static_range(GROUP * HEADS):
                    _merge_splits(Out, Mid_out, Mid_lse, req, kv_head0 * GROUP + r, used,
                                  stride_ot, stride_oh, stride_mb, stride_mh, stride_ms,
                                  stride_lb, stride_lh, HEAD_DIM, BLOCK_S, BLOCK_D)  # fmt: skip
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")


@triton.jit
def _merge_splits(
    Out,
    Mid_out,
    Mid_lse,
    req,
    head,
    used,
    stride_ot,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the first `used` splits of (`req`, query `head`) into its output row (zeros when
    none holds keys). Reads through L2 (`.cg`): with `FIXUP` other SMs wrote the splits."""
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < used
    base = req.to(tl.int64) * stride_mb + head * stride_mh + offs_s * stride_ms
    lse_row = Mid_lse + req.to(tl.int64) * stride_lb + head * stride_lh
    lse = tl.load(lse_row + offs_s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    weights = tl.where(s_mask, tl.exp2(lse - tl.max(tl.where(s_mask, lse, -1e30), 0)), 0.0)
    parts = tl.load(
        Mid_out + base[:, None] + offs_d[None, :],
        mask=s_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
        cache_modifier=".cg",
    )
    out = tl.sum(weights[:, None] * parts, 0) / tl.maximum(tl.sum(weights, 0), 1e-30)
    tl.store(
        Out + req * stride_ot + head * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@triton.jit(do_not_specialize=["num_splits"])
def _decode_reduce_kernel(
    Out,
    Mid_out,
    Mid_lse,
    Seq_lens,
    num_splits,
    stride_ot,
    stride_oh,
    stride_mb,
    stride_mh,
    stride_ms,
    stride_lb,
    stride_lh,
    HEAD_DIM: tl.constexpr,
    MIN_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Merge the splits that hold keys (the others wrote nothing); a request without keys (a
    padded row) gets zeros."""
    req = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(Seq_lens + req)
    used = tl.cdiv(seq_len, _split_chunk(seq_len, num_splits, MIN_CHUNK, BLOCK_N))
    _merge_splits(Out, Mid_out, Mid_lse, req, head, used, stride_ot, stride_oh, stride_mb,
                  stride_mh, stride_ms, stride_lb, stride_lh, HEAD_DIM, BLOCK_S, BLOCK_D)  # fmt: skip


def choose_num_splits(
    num_requests: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    block_n: int | None = None,
    config: DecodeConfig | None = None,
) -> int:
    """Splits per request for the variant the batch runs (`config`, else `decode_config`):
    about two programs per SM, but never so many that a split gets fewer than two tiles of
    keys, and at most the variant's `split_cap` (16); a variant with `min_chunk` splits up to
    `ceil(max_seq_len / min_chunk)` whatever the batch. Never more than a batch of one request
    gets (under its own variant), which sizes the CUDA graphs' workspace. (On the H100, 64
    requests x 8 KV heads ran fastest unsplit, one request of 8192 tokens with 16 splits:
    docs/benchmarks.md.) `block_n`: ignored, the variant's tile counts (kept for callers)."""
    splits = _splits(num_requests, num_kv_heads, max_seq_len, device, config)
    if num_requests > 1 and config is None:
        splits = min(splits, _splits(1, num_kv_heads, max_seq_len, device, None))
    return splits


def _splits(
    num_requests: int,
    num_kv_heads: int,
    max_seq_len: int,
    device: torch.device,
    config: DecodeConfig | None,
) -> int:
    config = config or decode_config(num_requests)
    hp = heads_per_program(config, num_kv_heads, 128)
    programs = num_requests * (num_kv_heads // hp)
    # (ceiling divisions in Python: `triton.cdiv` is a constexpr function, ~5 us a call here)
    wanted = -(-2 * num_sms(device) // max(programs, 1))
    useful = -(-max_seq_len // (2 * config.block_n))
    splits = min(wanted, useful)
    if config.min_chunk:
        splits = max(splits, -(-max_seq_len // config.min_chunk))
    return max(1, min(splits, config.split_cap, MAX_SPLITS))


def launch_order(
    seq_lens: torch.Tensor, num_requests: int, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor | None:
    """`decode_attention`'s `order` for a launch of `num_requests` rows: their indices by
    sequence length, longest first (one sort on the device, CUDA-graph safe; into `out`, a
    (lengths, indices) pair of buffers of at least that many rows, when given), or None for
    batches under `ORDER_MIN_REQUESTS` or with `DECODE_ORDER` off.

    Why: a batch of many requests runs several waves of programs per SM, each program one
    request's keys; in row order a long request whose programs start in the last wave runs
    on after the others have finished (a tail of a few busy SMs). Longest first, the short
    ones fill in at the end (FlashAttention-3's longest-processing-time-first scheduling)."""
    if not DECODE_ORDER or num_requests < ORDER_MIN_REQUESTS:
        return None
    if out is None:
        return torch.argsort(seq_lens[:num_requests], descending=True)
    values, indices = out[0][:num_requests], out[1][:num_requests]
    torch.sort(seq_lens[:num_requests], descending=True, out=(values, indices))
    return indices


def decode_block_n(head_dim: int) -> int:
    """Keys per tile of the decode kernel's one-request variant: 64 (32 for head sizes above
    128); kept for callers (each variant has its own tile)."""
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
    workspace: tuple[torch.Tensor, ...] | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    f16: bool | None = None,
    fma: bool | None = None,
    config: DecodeConfig | str | None = None,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one query token per request over its paged KV; returns `out`.

    `q`, `out`: `[num_requests, num_heads, head_dim]` (request `i`'s token is row `i`);
    `k_cache`, `v_cache`: `[num_pages, page_size, num_kv_heads, head_dim]`;
    `page_table`: int32 `[>= num_requests, >= max pages]`, row `i` lists request `i`'s pages;
    `seq_lens`: int32 `[>= num_requests]`, keys each request attends to (its new one included).
    With `num_splits > 1`, `workspace` holds float32 partial outputs
    `[>= num_requests, num_heads, num_splits, head_dim]`, log-sum-exps
    `[>= num_requests, num_heads, num_splits]` and the fix-up counters (`decode_workspace`;
    allocated here when None). `config`: the
    launch variant (a `DecodeConfig` or a name in `DECODE_VARIANTS`; default: `decode_config`
    of the batch size); `block_n`, `num_warps`, `num_stages` override its fields. `f16`: run
    the dots in float16 (default: the config's `f16_dot` for an FP8 cache, see `to_dot_dtype`). `fma`: CUDA-core
    products instead of tensor-core dots, the GQA group not padded to 16 rows, one KV head per
    program (default: `FP8_DECODE` for an FP8 cache with a group of at most 8, else off).
    `order`: an integer permutation of the `num_requests` rows (`launch_order`), the request
    each program row serves, in the order the GPU starts them: longest first, so no long
    request's programs start last and run alone at the end (the output is the same bits).
    Everything here is decided on the host from shapes and arguments: capture-safe.
    """
    num_requests, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if num_requests == 0:
        return out
    if isinstance(config, str):
        config = DECODE_VARIANTS[config]
    transposed = k_cache.element_size() == 1 and values_transposed(v_cache)
    config = config or decode_config(num_requests, e4m3_dots=transposed)
    q = unit_last_dim(q)
    if uses_fp8_mma(config, k_cache, v_cache, fma):  # e4m3 tensor-core dots
        return decode_fp8mma(q, k_cache, v_cache, page_table, seq_lens, scale * LOG2E, out,
                             num_splits, workspace, block_n, num_warps, num_stages, config,
                             order)  # fmt: skip
    meta = decode_meta(config, q.dtype, k_cache.dtype, group, num_kv_heads, head_dim,
                       k_cache.shape[1], num_splits > 1, block_n, f16, fma)  # fmt: skip
    if num_splits > 1 and workspace is None:
        workspace = decode_workspace(num_requests, num_heads, num_splits, head_dim, q.device)
    mid_out, mid_lse, *counters = workspace if num_splits > 1 else (out, out)
    counters = counters[0] if counters else None  # (a workspace of two: no fix-up)
    head_blocks = num_kv_heads // meta["HEADS"]
    # the splits merged by the last one to finish (counters of the workspace, zero between
    # launches), else by the reduce kernel
    fixup = (
        meta["FIXUP"]
        and num_splits <= MAX_SPLITS
        and counters is not None
        and num_requests * head_blocks <= len(counters)
    )
    grid = (num_requests, head_blocks, num_splits)
    if config.head_fastest:
        grid = (head_blocks, num_requests, num_splits)
    pdl = launch_options(q.device) if config.pdl else {"PDL": False}
    _decode_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        mid_out,
        mid_lse,
        page_table,
        seq_lens,
        counters if fixup else seq_lens,
        seq_lens if order is None else order,
        scale * LOG2E,
        num_splits,
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
        num_warps=num_warps or config.num_warps,
        num_stages=num_stages or config.num_stages,
        **pdl,
        # the reduce kernel's split block, so the merge sums alike (unused without the fix-up:
        # 1, one key for every split count)
        **(meta | {"FIXUP": fixup, "BLOCK_S": triton.next_power_of_2(num_splits) if fixup else 1}),
        ORDERED=order is not None,
    )
    if num_splits > 1 and not fixup:
        reduce_splits(out, mid_out, mid_lse, seq_lens, num_splits, meta)
    return out


def reduce_splits(out, mid_out, mid_lse, seq_lens, num_splits: int, meta: dict) -> None:
    """Merge the splits' partial outputs and log-sum-exps (`mid_out`, `mid_lse`) into `out`
    (`meta`: the decode kernel's `MIN_CHUNK`, `BLOCK_N`, `BLOCK_D`, which set the chunking)."""
    num_requests, num_heads, head_dim = out.shape
    _decode_reduce_kernel[(num_requests, num_heads)](
        out,
        mid_out,
        mid_lse,
        seq_lens,
        num_splits,
        out.stride(0),
        out.stride(1),
        mid_out.stride(0),
        mid_out.stride(1),
        mid_out.stride(2),
        mid_lse.stride(0),
        mid_lse.stride(1),
        HEAD_DIM=head_dim,
        MIN_CHUNK=meta["MIN_CHUNK"],
        BLOCK_N=meta["BLOCK_N"],
        BLOCK_S=triton.next_power_of_2(num_splits),
        BLOCK_D=meta["BLOCK_D"],
        num_warps=4 if head_dim >= 128 else 2,
    )


def decode_meta(
    config: DecodeConfig,
    q_dtype: torch.dtype,
    kv_dtype: torch.dtype,
    group: int,
    num_kv_heads: int,
    head_dim: int,
    page_size: int,
    split: bool,
    block_n: int | None = None,
    f16: bool | None = None,
    fma: bool | None = None,
) -> dict:
    """`_decode_kernel`'s compile-time arguments for a launch of `config` (see
    `decode_attention` for `block_n`, `f16`, `fma`); `decode_compile` compiles the same."""
    fp8 = kv_dtype.itemsize == 1
    f16_dots = _f16_dot(q_dtype, fp8, config.f16_dot if f16 is None and fp8 else f16)
    if fma is None:
        fma = FP8_DECODE == "fma" and fp8 and group <= 8
    block_d = max(16, triton.next_power_of_2(head_dim))
    hp = 1 if fma else heads_per_program(config, num_kv_heads, block_d)
    rows = triton.next_power_of_2(group * hp)
    block_h = rows if fma else max(16, rows)
    block_n = block_n or (config.block_n if head_dim <= 128 else min(config.block_n, 32))
    if fma:  # the [BLOCK_H, BLOCK_N, BLOCK_D] products live in registers: ~64 per thread
        block_n = max(16, min(block_n, 8192 // (block_h * block_d)))
    return {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "PAGE_SIZE": page_size,
        "SPLIT": split,
        "MIN_CHUNK": max(-(-config.min_chunk // block_n) * block_n, block_n),  # (>0: reduce)
        "HEADS": hp,
        "HEAD_FASTEST": config.head_fastest,
        "PREFETCH": config.prefetch_pages,
        "BLOCK_H": block_h,
        "BLOCK_N": block_n,
        "BLOCK_D": block_d,
        "PRECISION": dot_precision(q_dtype),
        "F16_DOT": f16_dots,
        "FMA": fma,
        # 2: inline PTX (1 under the interpreter, which cannot run it: the plain cast)
        "CVT": (1 if _INTERPRET else 2) if config.asm_cvt and fp8 and f16_dots and not fma else 0,
        "FIXUP": config.fixup and split,  # (off where the workspace has no counters for it)
        "BLOCK_S": MAX_SPLITS if config.fixup and split else 1,  # (the launch: its splits')
    }


def decode_workspace(
    num_requests: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The split workspace `decode_attention` expects: float32 partial outputs, their
    log-sum-exps (base 2), and int32 counters (one per request and KV head, zero between
    launches) for the variants whose last split merges the others (`DecodeConfig.fixup`)."""
    mid_out = torch.empty(
        num_requests, num_heads, num_splits, head_dim, dtype=torch.float32, device=device
    )
    mid_lse = torch.empty(num_requests, num_heads, num_splits, dtype=torch.float32, device=device)
    counters = torch.zeros(num_requests * num_heads, dtype=torch.int32, device=device)
    return mid_out, mid_lse, counters
