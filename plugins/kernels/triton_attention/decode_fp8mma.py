"""Paged decode attention over an FP8 (e4m3) KV cache with both products in e4m3 on the tensor
cores: no per-element conversion of keys or values (docs/kernels.md, "FP8 tensor-core decode").

The decode kernel of `decode.py` converts every e4m3 key and value to 16 bits before its dots,
which costs 6-7.5 instructions per KV element on sm_90 and caps it near half the H200's
bandwidth. Here the dots take e4m3 operands as stored, as FlashAttention-3's FP8 path does:

- the query is quantized to e4m3 once per program, per query row (`amax / 448`, the scale
  folded into that row's softmax scale);
- the logits are computed transposed, `Sᵀ = K · Qᵀ` (`[keys, rows]`): the keys are the MMA's
  M side (64 per tile, which Hopper's `wgmma` needs) and the GQA group's rows, padded to 16,
  its N side, so a group of 2 does not pad to 64 rows;
- the probabilities, `exp2(s - max)` in float32, are scaled by `P_SCALE` (256, a power of two:
  exact) into e4m3's range and quantized; the running sum `l` is the float32 sum of the same
  scaled values, so the scale cancels in `acc / l`;
- `Oᵀ += Vᵀ · Pᵀ` (`[head_dim, rows]`): FP8 MMAs need both operands K-major (their reduction
  axis contiguous), so the value tile must be keys-contiguous. An FP8 pool stores values
  transposed per page for this (`KVPool.v_layout == "hdp"`: a page's values are
  `[num_kv_heads, head_dim, page_size]`); the kernel takes every stride of the value cache, so
  it also reads the NHD layout (correct, but the compiler then transposes each value tile).

One KV head per program (two with `heads_per_program=2` and `v_tile`: their keys stacked on the
MMA's M side); the grid, page prefetch and split scheme are `decode.py`'s (the same
`DecodeConfig` fields, the same workspace and reduce kernel). With `DecodeConfig.streams=2` a
program keeps two online softmaxes over alternate tiles, merged at its end (docs/kernels.md,
"Two softmax streams per program")."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from pegboard.plugins.kernels.triton_attention.decode_configs import (
    DecodeConfig,
    heads_per_program,
)

#: The probabilities' scale into e4m3's range (a power of two: exact, its log2 exact).
P_SCALE = 256.0
#: e4m3's largest finite value.
E4M3_MAX = tl.constexpr(448.0)


@triton.jit
def _page_ids(pages_row, toks, end, last_page, PAGE_SIZE: tl.constexpr, V_TILE: tl.constexpr):
    """The page id of each key in `toks` (int64; page 0 past the end). With `V_TILE` masked per
    page, so each run of PAGE_SIZE ids is provably one value (the value tile's contiguity);
    else per key."""
    page = toks // PAGE_SIZE
    if V_TILE:
        ids = tl.load(pages_row + page, mask=page < last_page, other=0)
    else:
        ids = tl.load(pages_row + page, mask=toks < end, other=0)
    return ids.to(tl.int64)


@triton.jit
def _tile_page_ids(
    pages_row,
    toks,
    tile,
    offs_n,
    end,
    last_page,
    PAGE_SIZE: tl.constexpr,
    V_TILE: tl.constexpr,
    LEAN: tl.constexpr,
):
    """`_page_ids(toks)` for the keys `toks == tile + offs_n`. `LEAN`: `tile` is a multiple of
    PAGE_SIZE, so the page index is a scalar plus a constant vector (no signed division per
    key), and the ids, never negative, are zero-extended (no sign extension per key)."""
    if LEAN:
        page = tile // PAGE_SIZE + offs_n // PAGE_SIZE
        ids = tl.load(pages_row + page, mask=page < last_page, other=0)
        return ids.to(tl.uint32).to(tl.int64)
    return _page_ids(pages_row, toks, end, last_page, PAGE_SIZE, V_TILE)


@triton.jit
def _kv_tile(
    k_base,
    v_base,
    pages_row,
    pages,
    tile,
    offs_n,
    offs_p,
    offs_s,
    d_mask,
    end,
    row_head,
    stride_kp,
    stride_ks,
    stride_vp,
    stride_vs,
    stride_vh,
    PAGE_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SEG: tl.constexpr,
    V_HDP: tl.constexpr,
    V_TILE: tl.constexpr,
    LEAN: tl.constexpr,
    HP: tl.constexpr,
):
    """The key tile `[HP * BLOCK_N, BLOCK_D]` and value tile `[BLOCK_D, HP * BLOCK_N]` (e4m3)
    of the keys `tile + offs_n` (page ids `pages`), and which of them are before `end`."""
    toks = tile + offs_n
    n_mask = toks < end
    if LEAN:  # the tile starts a page: the offsets in the page are the same every tile;
        # keys past the end unmasked (their logits are, after the dot): no predicate per row
        in_page = offs_n % PAGE_SIZE
        k_mask = d_mask[None, :]
    else:
        in_page = toks % PAGE_SIZE
        k_mask = n_mask[:, None] & d_mask[None, :]
    k = tl.load(k_base + (pages * stride_kp + in_page * stride_ks)[:, None], mask=k_mask, other=0.0)
    if V_TILE:
        # One [BLOCK_D, BLOCK_N] tile: its pointers are contiguous in runs of PAGE_SIZE
        # keys (one page id per run, `pages` constant over it), so the pipeliner stages it
        # in the MMA's swizzled shared layout with 16-byte copies and the second dot reads
        # it from there (`SEG`'s 3-D tile goes through an unswizzled buffer, bank-conflicted
        # copies and ldmatrix into registers). Unmasked by key as below.
        v_rows = pages * stride_vp + in_page
        if HP > 1:
            v_rows += row_head * stride_vh
        v_rows = tl.max_contiguous(tl.multiple_of(v_rows, SEG), SEG)
        vt = tl.load(v_base + v_rows[None, :], mask=d_mask[:, None], other=0.0)
    elif V_HDP:  # per run of SEG tokens in one page: its page id, then SEG bytes per dim
        seg = tile + offs_p * SEG
        seg_pages = tl.load(pages_row + seg // PAGE_SIZE, mask=seg < end, other=0)
        seg_rows = tl.multiple_of(seg_pages.to(tl.int64) * stride_vp + seg % PAGE_SIZE, SEG)
        v_ptrs = v_base[:, :, None] + seg_rows[None, :, None] + offs_s[None, None, :]
        # Not masked by key (a mask varying along the tokens would split the contiguous
        # runs into single bytes): keys past the end read their page's stale values or
        # page 0's (a masked page id), finite as every stored value is, times p = 0.
        vt = tl.load(v_ptrs, mask=d_mask[:, None, None], other=0.0)
        vt = tl.reshape(vt, [BLOCK_D, BLOCK_N])  # [D, N] e4m3
    else:
        v_rows = pages * stride_vp + in_page * stride_vs
        if HP > 1:
            v_rows += row_head * stride_vh
        vt = tl.load(v_base + v_rows[None, :], mask=d_mask[:, None] & n_mask[None, :], other=0.0)
    return k, vt, n_mask


@triton.jit
def _logits(k, q8t, col_scale, n_mask, row_head, col_head, HP: tl.constexpr):
    """Sᵀ `[HP * BLOCK_N, BLOCK_H]` in float32, base 2, -inf past the end (and, with `HP`
    heads, where a column's query and a row's key are of different KV heads)."""
    st = tl.dot(k, q8t) * col_scale[None, :]
    if HP > 1:  # each column's logits over its own head's keys
        return tl.where(
            n_mask[:, None] & (row_head[:, None] == col_head[None, :]), st, float("-inf")
        )
    return tl.where(n_mask[:, None], st, float("-inf"))


@triton.jit
def _probabilities(
    st, m_i, m_new, sums, LOG2_P_SCALE: tl.constexpr, ROW_SUM_ONCE: tl.constexpr,
    MAY_BE_EMPTY: tl.constexpr,
):  # fmt: skip
    """The online softmax's step to the running max `m_new`: the rescale `alpha` of what came
    before, `Pᵀ * P_SCALE` (at most P_SCALE) and the running sums rescaled plus this tile's.
    `MAY_BE_EMPTY`: the stream may not have seen a key yet (`m_new` -inf: all zeros, not NaN)."""
    if MAY_BE_EMPTY:
        m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    pt = tl.exp2(st - (m_new - LOG2_P_SCALE)[None, :])  # p * P_SCALE, at most P_SCALE
    if ROW_SUM_ONCE:  # no reduction across the warps (shared memory, a barrier) per tile
        sums = sums * alpha[None, :] + pt
    else:
        sums = sums * alpha + tl.sum(pt, 0)
    return alpha, pt, sums


@triton.jit
def _decode_fp8mma_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    Mid_out,
    Mid_lse,
    Page_table,
    Seq_lens,
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
    stride_vd,
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
    HEAD_FASTEST: tl.constexpr,
    PREFETCH: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    LOG2_P_SCALE: tl.constexpr,
    V_HDP: tl.constexpr,
    SEG: tl.constexpr,
    V_TILE: tl.constexpr,
    ROW_SUM_ONCE: tl.constexpr,
    LEAN: tl.constexpr,
    HP: tl.constexpr,
    STREAMS: tl.constexpr = 1,
    ORDERED: tl.constexpr = False,
):
    if HEAD_FASTEST:
        kv_head = tl.program_id(0) * HP
        req = tl.program_id(1)
    else:
        req = tl.program_id(0)
        kv_head = tl.program_id(1) * HP
    split = tl.program_id(2)
    if ORDERED:  # launch order: the longest requests' programs first (`decode_attention`)
        req = tl.load(Order + req).to(tl.int32)
    seq_len = tl.load(Seq_lens + req)
    if SPLIT:
        chunk = tl.maximum(tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N, MIN_CHUNK)
        start = split * chunk
        end = tl.minimum(start + chunk, seq_len)
    else:
        start = 0
        end = seq_len

    offs_h = tl.arange(0, BLOCK_H)
    if HP > 1:  # row r of a tile: key r % BLOCK_N of KV head r // BLOCK_N (keys of HP heads)
        offs_n = tl.arange(0, HP * BLOCK_N) % BLOCK_N
        row_head = tl.arange(0, HP * BLOCK_N) // BLOCK_N
        col_head = tl.minimum(offs_h // GROUP, HP - 1)  # (padding columns: q = 0, s = 0)
    else:
        offs_n = tl.arange(0, BLOCK_N)
        row_head = offs_n * 0  # (unused: one head)
        col_head = offs_h * 0
    offs_d = tl.arange(0, BLOCK_D)
    offs_p = tl.arange(0, BLOCK_N // SEG)  # runs of SEG tokens (one page each) in a tile
    offs_s = tl.arange(0, SEG)
    heads = kv_head * GROUP + offs_h
    h_mask = offs_h < tl.where(start < end, GROUP * HP, 0)  # an empty split writes nothing
    d_mask = offs_d < HEAD_DIM
    hd_mask = h_mask[:, None] & d_mask[None, :]
    q = tl.load(
        Q + req * stride_qt + heads[:, None] * stride_qh + offs_d[None, :], mask=hd_mask, other=0.0
    ).to(tl.float32)
    # Per row: q = q8 * q_scale, q8 in e4m3 (the row's largest magnitude maps to 448).
    amax = tl.max(tl.abs(q), 1)
    q_scale = tl.where(amax > 0, amax / E4M3_MAX, 1.0)
    q8 = tl.minimum(tl.maximum(q / q_scale[:, None], -E4M3_MAX), E4M3_MAX)
    q8t = tl.trans(q8.to(tl.float8e4nv))  # [BLOCK_D, BLOCK_H]: the logits' B operand
    col_scale = q_scale * qk_scale  # the logits' scale per query row (base 2)

    k_base = K_cache + kv_head * stride_kh + offs_d[None, :]
    if V_HDP:  # a page's values `[kv_heads, head_dim, page_size]`: tokens contiguous
        v_base = V_cache + kv_head * stride_vh + offs_d[:, None] * PAGE_SIZE
    else:
        v_base = V_cache + kv_head * stride_vh + offs_d[:, None] * stride_vd
    if HP > 1:
        k_base += (row_head * stride_kh)[:, None]
    pages_row = Page_table + req.to(tl.int64) * stride_pt
    last_page = tl.cdiv(end, PAGE_SIZE)
    if PREFETCH:
        pages = _tile_page_ids(
            pages_row, start + offs_n, start, offs_n, end, last_page, PAGE_SIZE, V_TILE, LEAN
        )
    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    sums = tl.zeros([BLOCK_H], dtype=tl.float32)  # the running sums per row
    if ROW_SUM_ONCE:  # per key slot of the tile instead, summed over the keys after the loop
        sums = tl.zeros([HP * BLOCK_N, BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D, BLOCK_H], dtype=tl.float32)  # Oᵀ
    if STREAMS == 1:
        for tile in range(start, end, BLOCK_N):
            toks = tile + offs_n
            if not PREFETCH:
                pages = _tile_page_ids(pages_row, toks, tile, offs_n, end, last_page, PAGE_SIZE,
                                       V_TILE, LEAN)  # fmt: skip
            k, vt, n_mask = _kv_tile(k_base, v_base, pages_row, pages, tile, offs_n, offs_p,
                                     offs_s, d_mask, end, row_head, stride_kp, stride_ks,
                                     stride_vp, stride_vs, stride_vh, PAGE_SIZE, BLOCK_N,
                                     BLOCK_D, SEG, V_HDP, V_TILE, LEAN, HP)  # fmt: skip
            if PREFETCH:
                pages = _tile_page_ids(pages_row, toks + BLOCK_N, tile + BLOCK_N, offs_n, end,
                                       last_page, PAGE_SIZE, V_TILE, LEAN)  # fmt: skip
            st = _logits(k, q8t, col_scale, n_mask, row_head, col_head, HP)
            m_new = tl.maximum(m_i, tl.max(st, 0))
            alpha, pt, sums = _probabilities(st, m_i, m_new, sums, LOG2_P_SCALE, ROW_SUM_ONCE,
                                             False)  # fmt: skip
            acc = acc * alpha[None, :] + tl.dot(vt, pt.to(tl.float8e4nv))
            m_i = m_new
    else:
        # Two online softmaxes (docs/kernels.md, "Two softmax streams per program"): tile 2i
        # of the range goes to stream A, tile 2i + 1 to B, each with its own max, sums and
        # accumulator, merged after the loop. An iteration reads 2 * BLOCK_N adjacent keys
        # (one run of page ids, one loop counter, as a tile of 2 * BLOCK_N would), and each
        # step below is written for both streams before the next, so their work between the
        # MMAs interleaves (Triton waits for each MMA right after issuing it: the products
        # themselves do not overlap). With an odd number of tiles the last B tile lies past
        # the end: all its logits -inf, p = 0.
        m_b = m_i
        sums_b = sums
        acc_b = acc
        if PREFETCH:
            pages_b = _tile_page_ids(pages_row, start + BLOCK_N + offs_n, start + BLOCK_N,
                                     offs_n, end, last_page, PAGE_SIZE, V_TILE, LEAN)  # fmt: skip
        for tile in range(start, end, 2 * BLOCK_N):
            if not PREFETCH:
                pages = _tile_page_ids(pages_row, tile + offs_n, tile, offs_n, end, last_page,
                                       PAGE_SIZE, V_TILE, LEAN)  # fmt: skip
                pages_b = _tile_page_ids(pages_row, tile + BLOCK_N + offs_n, tile + BLOCK_N,
                                         offs_n, end, last_page, PAGE_SIZE, V_TILE,
                                         LEAN)  # fmt: skip
            k, vt, n_mask = _kv_tile(k_base, v_base, pages_row, pages, tile, offs_n, offs_p,
                                     offs_s, d_mask, end, row_head, stride_kp, stride_ks,
                                     stride_vp, stride_vs, stride_vh, PAGE_SIZE, BLOCK_N,
                                     BLOCK_D, SEG, V_HDP, V_TILE, LEAN, HP)  # fmt: skip
            k_b, vt_b, n_mask_b = _kv_tile(k_base, v_base, pages_row, pages_b, tile + BLOCK_N,
                                           offs_n, offs_p, offs_s, d_mask, end, row_head,
                                           stride_kp, stride_ks, stride_vp, stride_vs,
                                           stride_vh, PAGE_SIZE, BLOCK_N, BLOCK_D, SEG, V_HDP,
                                           V_TILE, LEAN, HP)  # fmt: skip
            if PREFETCH:
                pages = _tile_page_ids(pages_row, tile + 2 * BLOCK_N + offs_n,
                                       tile + 2 * BLOCK_N, offs_n, end, last_page, PAGE_SIZE,
                                       V_TILE, LEAN)  # fmt: skip
                pages_b = _tile_page_ids(pages_row, tile + 3 * BLOCK_N + offs_n,
                                         tile + 3 * BLOCK_N, offs_n, end, last_page,
                                         PAGE_SIZE, V_TILE, LEAN)  # fmt: skip
            st = _logits(k, q8t, col_scale, n_mask, row_head, col_head, HP)
            st_b = _logits(k_b, q8t, col_scale, n_mask_b, row_head, col_head, HP)
            # both tiles' maxima in one reduction (one exchange across the warps, not two)
            m_new, m_new_b = tl.split(tl.max(tl.join(st, st_b), 0))
            m_new = tl.maximum(m_i, m_new)
            m_new_b = tl.maximum(m_b, m_new_b)
            alpha, pt, sums = _probabilities(st, m_i, m_new, sums, LOG2_P_SCALE, ROW_SUM_ONCE,
                                             False)  # fmt: skip
            alpha_b, pt_b, sums_b = _probabilities(st_b, m_b, m_new_b, sums_b, LOG2_P_SCALE,
                                                   ROW_SUM_ONCE, True)  # fmt: skip
            acc = acc * alpha[None, :] + tl.dot(vt, pt.to(tl.float8e4nv))
            acc_b = acc_b * alpha_b[None, :] + tl.dot(vt_b, pt_b.to(tl.float8e4nv))
            m_i = m_new
            m_b = m_new_b
        # the log-sum-exp merge of the two (a stream without keys has m = -inf: weight 0)
        m_both = tl.maximum(m_i, m_b)
        m_ref = tl.where(m_both == float("-inf"), 0.0, m_both)
        alpha = tl.exp2(m_i - m_ref)
        alpha_b = tl.exp2(m_b - m_ref)
        if ROW_SUM_ONCE:
            sums = sums * alpha[None, :] + sums_b * alpha_b[None, :]
        else:
            sums = sums * alpha + sums_b * alpha_b
        acc = acc * alpha[None, :] + acc_b * alpha_b[None, :]
        m_i = m_both

    if ROW_SUM_ONCE:
        l_i = tl.sum(sums, 0)
    else:
        l_i = sums
    # Row h of the output is column h of acc.
    if not SPLIT:
        out = acc / l_i[None, :]
        tl.store(
            Out + req * stride_ot + heads[None, :] * stride_oh + offs_d[:, None],
            out.to(Out.dtype.element_ty),
            mask=d_mask[:, None] & h_mask[None, :],
        )
    else:
        has_keys = l_i > 0
        out = acc / tl.where(has_keys, l_i, 1.0)[None, :]
        lse = m_i + tl.log2(tl.where(has_keys, l_i, 1.0)) - LOG2_P_SCALE
        lse = tl.where(has_keys, lse, float("-inf"))
        mid = req.to(tl.int64) * stride_mb + heads * stride_mh + split * stride_ms
        tl.store(
            Mid_out + mid[None, :] + offs_d[:, None], out, mask=d_mask[:, None] & h_mask[None, :]
        )
        tl.store(
            Mid_lse + req.to(tl.int64) * stride_lb + heads * stride_lh + split, lse, mask=h_mask
        )


def values_transposed(v_cache: torch.Tensor) -> bool:
    """Whether a value cache (logically `[num_pages, page_size, num_kv_heads, head_dim]`) stores
    each page's values as `[num_kv_heads, head_dim, page_size]` (`KVPool.v_layout == "hdp"`):
    tokens contiguous, one head dimension every `page_size` elements."""
    page_size = v_cache.shape[1]
    return v_cache.stride(1) == 1 and (v_cache.stride(3) == page_size or v_cache.shape[3] == 1)


def fp8mma_meta(
    block_n: int,
    group: int,
    head_dim: int,
    page_size: int,
    split: bool,
    min_chunk: int,
    hdp: bool,
    v_tile: bool = False,
    row_sum_once: bool = False,
    lean_addr: bool = False,
    heads_per_program: int = 1,
    streams: int = 1,
) -> dict:
    """`_decode_fp8mma_kernel`'s compile-time arguments (the launcher's `head_fastest` and
    `prefetch_pages` are added by the caller); `v_tile`, `row_sum_once`, `lean_addr`:
    `DecodeConfig`'s; `heads_per_program`: `decode_configs.heads_per_program`'s (1 unless the
    value tile is one `[head_dim, keys]` tile: over NHD values, or `v_tile` over `hdp`);
    `streams`: `DecodeConfig.streams` (online softmaxes per program, 1 or 2)."""
    pow2_page = page_size & (page_size - 1) == 0
    v_tile = v_tile and hdp and pow2_page
    hp = heads_per_program if v_tile or not hdp else 1
    return {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "PAGE_SIZE": page_size,
        "SPLIT": split,
        "MIN_CHUNK": max(-(-min_chunk // block_n) * block_n, block_n),
        "BLOCK_H": max(16, triton.next_power_of_2(group * hp)),
        "BLOCK_N": block_n,
        "BLOCK_D": max(32, triton.next_power_of_2(head_dim)),
        "LOG2_P_SCALE": math.log2(P_SCALE),
        # The per-page runs need page ids that tile the keys: a power-of-two page size
        "V_HDP": hdp and pow2_page,
        "SEG": min(page_size, block_n) if pow2_page else 1,
        "V_TILE": v_tile,
        "ROW_SUM_ONCE": row_sum_once,
        # Every tile starts at a multiple of block_n (splits are whole tiles): of the page too
        "LEAN": lean_addr and block_n % page_size == 0,
        "HP": hp,
        "STREAMS": streams,
    }


def uses_fp8_mma(
    config: DecodeConfig, k_cache: torch.Tensor, v_cache: torch.Tensor, fma: bool | None = None
) -> bool:
    """Whether a decode launch runs this kernel: over an FP8 cache, for an `fp8_mma` variant,
    and for every variant over transposed values (`decode.py`'s kernel reads values with unit
    stride along the head dimension), unless the caller asks for CUDA-core products
    (`fma=True`) over NHD values."""
    if k_cache.element_size() != 1:
        return False
    if values_transposed(v_cache):
        return True
    return config.fp8_mma and not fma


def decode_fp8mma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    qk_scale: float,
    out: torch.Tensor,
    num_splits: int,
    workspace: tuple[torch.Tensor, torch.Tensor] | None,
    block_n: int | None,
    num_warps: int | None,
    num_stages: int | None,
    config: DecodeConfig,
    order: torch.Tensor | None = None,
) -> torch.Tensor:
    """`decode.decode_attention` with this kernel (same arguments; `qk_scale` in base 2): one
    KV head per program, the variant's tile, grid order, prefetch and split scheme, the same
    split workspace and reduce kernel."""
    from pegboard.plugins.kernels.triton_attention import decode

    num_requests, num_heads, head_dim = q.shape
    num_kv_heads, page_size = k_cache.shape[2], k_cache.shape[1]
    split = num_splits > 1
    bn = block_n or (config.block_n if head_dim <= 128 else min(config.block_n, 64))
    meta = fp8mma_meta(bn, num_heads // num_kv_heads, head_dim, page_size, split,
                       config.min_chunk, values_transposed(v_cache), config.v_tile,
                       config.row_sum_once, config.lean_addr,
                       heads_per_program(config, num_kv_heads, head_dim),
                       config.streams)  # fmt: skip
    if split and workspace is None:
        workspace = decode.decode_workspace(num_requests, num_heads, num_splits, head_dim, q.device)
    mid_out, mid_lse, *_ = workspace if split else (out, out)  # (fix-up counters unused)
    grid = (num_requests, num_kv_heads // meta["HP"], num_splits)
    if config.head_fastest:
        grid = (num_kv_heads // meta["HP"], num_requests, num_splits)
    _decode_fp8mma_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        mid_out,
        mid_lse,
        page_table,
        seq_lens,
        seq_lens if order is None else order,
        qk_scale,
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
        v_cache.stride(3),
        page_table.stride(0),
        mid_out.stride(0) if split else 0,
        mid_out.stride(1) if split else 0,
        mid_out.stride(2) if split else 0,
        mid_lse.stride(0) if split else 0,
        mid_lse.stride(1) if split else 0,
        HEAD_FASTEST=config.head_fastest,
        PREFETCH=config.prefetch_pages,
        num_warps=num_warps or config.num_warps,
        num_stages=num_stages or config.num_stages,
        ORDERED=order is not None,
        **meta,
    )
    if split:
        decode.reduce_splits(out, mid_out, mid_lse, seq_lens, num_splits, meta)
    return out


def _e4m3(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-448, 448).to(torch.float8_e4m3fn).float()


def reference_decode_fp8mma(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    splits: int,
    block_n: int,
    min_chunk: int = 0,
    streams: int = 1,
) -> torch.Tensor:
    """This kernel's arithmetic in PyTorch, float32, on any device (the oracle of its tests, and
    what `scripts/bench_kv_fp8.py --e4m3-dots` decodes with on a CPU): per row the query
    quantized to e4m3 (its amax to 448), per tile of `block_n` keys the online softmax with
    probabilities `exp2(s - m)` times `P_SCALE` quantized to e4m3 before `P @ V` (the running
    sum of the unquantized ones), per split of the keys (the kernel's chunking, `splits` and
    the variant's `min_chunk`) a partial result merged by log-sum-exp; with `streams` 2 a
    split's tiles alternate between two such online softmaxes, merged by log-sum-exp at its
    end (`DecodeConfig.streams`). `scale`: the softmax scale (natural base); returns
    `[num_requests, num_heads, head_dim]` float32."""
    page_size, kv_heads, head_dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    group = q.shape[1] // kv_heads
    min_chunk = max(-(-min_chunk // block_n) * block_n, block_n)
    log2e = 1.4426950408889634
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        pages = table[i, : -(-n // page_size)].long()
        keys = k_cache[pages].float().reshape(-1, kv_heads, head_dim)[:n]
        values = v_cache[pages].float().reshape(-1, kv_heads, head_dim)[:n]
        per_split = -(-n // splits)
        chunk = max(-(-per_split // block_n) * block_n, min_chunk) if splits > 1 else n
        for g in range(kv_heads):
            rows = q[i, g * group : (g + 1) * group].float()
            amax = rows.abs().amax(1)
            q_scale = torch.where(amax > 0, amax / 448, torch.ones_like(amax))
            q8 = _e4m3(rows / q_scale[:, None])
            parts = []
            for start in range(0, n, chunk):
                end = min(start + chunk, n)
                state = [(torch.full((group,), float("-inf"), device=q.device),
                          torch.zeros(group, device=q.device),
                          torch.zeros(group, head_dim, device=q.device))] * streams  # fmt: skip
                for j, tile in enumerate(range(start, end, block_n)):
                    m, total, acc = state[j % streams]
                    t = slice(tile, min(tile + block_n, end))
                    s = (q8 @ keys[t, g].T) * (q_scale * scale * log2e)[:, None]
                    m_new = torch.maximum(m, s.amax(1))
                    alpha = torch.exp2(m - m_new)
                    p = torch.exp2(s - (m_new - math.log2(P_SCALE))[:, None])
                    total = total * alpha + p.sum(1)
                    acc = acc * alpha[:, None] + _e4m3(p) @ values[t, g]
                    state[j % streams] = (m_new, total, acc)
                m = torch.stack([m for m, _, _ in state]).amax(0)
                weights = [torch.exp2(m_s - m) for m_s, _, _ in state]  # (no keys: 0)
                total = sum(w * total_s for w, (_, total_s, _) in zip(weights, state))
                acc = sum(w[:, None] * acc_s for w, (_, _, acc_s) in zip(weights, state))
                parts.append((acc / total[:, None], m + torch.log2(total) - math.log2(P_SCALE)))
            lse = torch.stack([p[1] for p in parts])  # [splits, group]
            weights = torch.softmax(lse * math.log(2), 0)
            out[i, g * group : (g + 1) * group] = sum(
                w[:, None] * o for w, (o, _) in zip(weights, parts)
            )
    return out
