"""Sampling by the Gumbel-max trick in one pass over the logits (Triton kernels).

`argmax(logits / T + G)` with `G` i.i.d. standard Gumbel picks token `i` with probability
`softmax(logits / T)[i]`: the same distribution as drawing from the softmax, without
computing it. The kernel reads each row's logits once; the softmax, the random tensor and
their quotient (each a `[rows, vocab]` float32 pass) never exist. Rows with `temperature == 0`
add no noise and skip the random numbers: their token is the argmax (the first one, as
`torch.argmax`); `argmax` is the same kernel for a batch with no sampled row.

The grid is (row, vocabulary chunk), with chunks sized so that even one row fills the GPU;
each program writes its chunk's best value and index, and a second, tiny kernel picks each
row's token from those (the earliest chunk wins ties).

What bounds it is arithmetic, not memory: per token the kernel makes a random number and two
logarithms, and on the H200 the session-7 kernel issued ~84 instructions per token (SASS:
~44 for two accurate `log2`, ~25 for a quarter of a Philox-4x32-10 call), ~200 µs for 256 rows
of 151,936 where reading them takes ~20. Two noise sources (`noise`):

- `"hash"` (default): a keyed 32-bit integer hash of (seed, token index), ~10 instructions,
  and the hardware `lg2.approx` for both logarithms (MUFU, one instruction each), the first
  replaced by a series where its absolute error would matter (`_exponential`); ~28
  instructions per token. A seed's tokens differ from the Philox stream's.
- `"philox"`: the kernel's stream until 2026-11-30 (`tl.rand4x`: one Philox call gives the
  noise of four neighbouring tokens) with the accurate `log2`: a seed gives bitwise the tokens
  it gave then, at about the old speed.

Either way row `i`'s noise is a function of its own `seed[i]` and the token index only, so a
request's draw does not depend on what else is in the batch, nor on the chunk and block sizes,
and giving each draw a fresh seed (the request's seed mixed with how many tokens it has drawn)
makes runs reproduce. Design and measurements: docs/kernels.md, "Sampling". Importing this
module imports Triton; on a CPU it runs under `TRITON_INTERPRET=1` (tests), where `lg2.approx`
(inline PTX) becomes `tl.log2`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: Vocabulary entries per block (one loop step of a program); chunks are multiples of it.
BLOCK = 2048
#: Programs a call aims at (the H200 has 132 SMs, each holding 4-6 of these 8-warp programs
#: at their 40-56 registers): enough waves that the last, partial one costs little, few enough that the chunks' partial results
#: stay small. `chunk_size` turns it into vocabulary entries per program.
TARGET_PROGRAMS = 4096
NOISES = ("hash", "philox")
NOISE = "philox"  # the standard sampler's default too, until the hash path is measured


@triton.jit
def _log2(x, APPROX: tl.constexpr):
    if APPROX:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _mix64(x):
    """The splitmix64 finalizer of a uint64 (wrapping arithmetic): a bijection that spreads
    every input bit over the output."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB
    return x ^ (x >> 31)


@triton.jit
def _keys(seed):
    """The hash's two 32-bit keys from a row's 64-bit seed, by the splitmix64 finalizer (once
    per program): seeds that differ in a few bits (0, 1, 2, ... or only the high half) still
    get unrelated keys."""
    k = _mix64(seed.to(tl.uint64, bitcast=True))
    return (k & 0xFFFFFFFF).to(tl.uint32), (k >> 32).to(tl.uint32)


@triton.jit
def _row_seed(seed_ptr, row, advance, DERIVE: tl.constexpr):
    """Row `row`'s int64 seed: read as given, or (`DERIVE`) the splitmix64 output of its
    state `seed_ptr[row]` advanced by `advance` steps, `mix64(state + advance * GAMMA)` to 63
    bits: what the standard sampler's `_draw_seeds` computes on the host, bit for bit (uint64
    arithmetic wraps modulo 2^64 here as in numpy), so a batch that recurs needs no upload."""
    seed = tl.load(seed_ptr + row)
    if DERIVE:
        state = seed.to(tl.uint64, bitcast=True) + advance.to(tl.uint64) * 0x9E3779B97F4A7C15
        seed = (_mix64(state) & 0x7FFFFFFFFFFFFFFF).to(tl.int64, bitcast=True)
    return seed


@triton.jit
def _hash_uniform(cols, k0, k1):
    """A uniform in [2^-32, 1] from token index `cols` and the key (k0, k1) (`_keys`): a
    multiplicative spread of the index, then the `lowbias32` finalizer (C. Wellons' hash
    prospector) with k1 xored in between its two rounds; for a fixed key a bijection of the
    index. All 32 bits count: the tokens that win on noise have the smallest values, and
    2^-32 steps let the noise reach 22.2 nats where 24-bit uniforms stop at 16.6 (a token that
    far below the top is drawn at its odds instead of never). The float conversion rounds
    values near 1 (harmless there); the largest 128 become exactly 1."""
    h = cols.to(tl.uint32) * 0x9E3779B1 ^ k0
    h = (h ^ (h >> 16)) * 0x21F0AAAD
    h = (h ^ (h >> 15) ^ k1) * 0x735A2D97
    h = h ^ (h >> 15)
    return h.to(tl.float32) * 2.3283064365386963e-10 + 2.3283064365386963e-10


@triton.jit
def _noisy(x, cols, u, scale, vocab, best, best_idx, APPROX: tl.constexpr):
    """The Philox path's lane update: `x * scale + G` (G standard Gumbel, in log2 units: the
    argmax is the same as in natural ones since the whole row is scaled by log2(e)) folded into
    the running best value and index. Kept as it was: it defines the Philox stream's tokens."""
    mask = cols < vocab
    e = tl.maximum(-_log2(u, APPROX), 1e-30)  # Exp(1) / ln 2; u == 0 gives +inf: never NaN
    gumbel = -_log2(e, APPROX)
    v = tl.where(mask, x.to(tl.float32) * scale + gumbel, float("-inf"))
    better = v > best
    return tl.where(better, v, best), tl.where(better, cols, best_idx)


@triton.jit
def _finish(best, best_idx, start):
    """A chunk's best value and the first index holding it (ties as torch.argmax); a chunk of
    -inf (or NaN) gives `start`."""
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    return top, tl.where(top == float("-inf"), start, first)


@triton.jit
def _value(x, cols, scale, k0, k1, NOISY: tl.constexpr, APPROX: tl.constexpr):
    """A token's score: its logit (greedy), or `x * scale + G` with hash noise (log2 units, as
    `_noisy`); a masked -inf stays -inf."""
    x = x.to(tl.float32)
    if NOISY:
        x = x * scale - _log2(_exponential(_hash_uniform(cols, k0, k1), APPROX), APPROX)
    return x


@triton.jit
def _exponential(u, APPROX: tl.constexpr):
    """Exp(1) / ln 2 as `-log2(1 - u)` from a uniform `u` in (0, 1]: never 0 (a 0 would make the
    Gumbel noise infinite and its token win whatever its logit), +inf at u = 1 (that token is
    not picked in this draw: probability 2^-25). The tokens that win on noise have small
    values, i.e. `1 - u` near 1, where `lg2.approx`'s absolute error (~2^-22) would swamp the
    result: below u = 2^-8 the series `u (1 + u / 2) / ln 2` (relative error < u^2 / 3 <
    2^-17) replaces it."""
    series = u * 1.4426950408889634 * (1.0 + 0.5 * u)
    return tl.where(u < 0.00390625, series, -_log2(1.0 - u, APPROX))


@triton.jit
def _fold(v, off, best, best_at):
    """Each lane keeps its best score and the block it was in (one select per token, no index
    arithmetic; ties keep the earlier block)."""
    better = v > best
    return tl.where(better, v, best), tl.where(better, off, best_at)


@triton.jit
def _scan(
    row_ptr,
    start,
    end,
    scale,
    k0,
    k1,
    NOISY: tl.constexpr,
    BLOCK: tl.constexpr,
    APPROX: tl.constexpr,
):
    """The chunk's best score and its first index, greedy or with hash noise: full blocks load
    unmasked, then the partial block, if any, masked."""
    lanes = tl.arange(0, BLOCK)
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_at = tl.zeros([BLOCK], tl.int32) + start
    full_end = start + (end - start) // BLOCK * BLOCK
    for off in range(start, full_end, BLOCK):
        x = tl.load(row_ptr + off + lanes)
        v = _value(x, off + lanes, scale, k0, k1, NOISY, APPROX)
        best, best_at = _fold(v, off, best, best_at)
    for off in range(full_end, end, BLOCK):
        x = tl.load(row_ptr + off + lanes, mask=off + lanes < end, other=float("-inf"))
        v = _value(x, off + lanes, scale, k0, k1, NOISY, APPROX)
        best, best_at = _fold(v, off, best, best_at)
    return _finish(best, best_at + lanes, start)


@triton.jit
def _scan_philox(
    row_ptr, start, end, vocab, scale, seed, BLOCK: tl.constexpr, APPROX: tl.constexpr
):
    """Sampled row, Philox noise: one call gives four uniforms, counter n draws columns
    4n .. 4n + 3, so a column's noise depends on (seed, column) only, whatever the tiling."""
    QUARTER: tl.constexpr = BLOCK // 4
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_idx = tl.zeros([QUARTER], tl.int32)
    for off in range(start, end, BLOCK):
        counters = off // 4 + tl.arange(0, QUARTER)
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        cols = counters * 4
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols, u0, scale, vocab, best, best_idx, APPROX)
        x = tl.load(row_ptr + cols + 1, mask=cols + 1 < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols + 1, u1, scale, vocab, best, best_idx, APPROX)
        x = tl.load(row_ptr + cols + 2, mask=cols + 2 < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols + 2, u2, scale, vocab, best, best_idx, APPROX)
        x = tl.load(row_ptr + cols + 3, mask=cols + 3 < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols + 3, u3, scale, vocab, best, best_idx, APPROX)
    return _finish(best, best_idx, start)


# No key per batch size (`num_chunks`: `chunk_size`) nor per step (`advance`).
@triton.jit(do_not_specialize=["num_chunks", "advance"])
def _chunk_best(
    logits_ptr,
    stride,
    inv_temp_ptr,
    seed_ptr,
    advance,
    best_val_ptr,
    best_idx_ptr,
    vocab,
    chunk,
    num_chunks,
    NOISE: tl.constexpr,  # "hash", "philox", or "none" (every row greedy)
    DERIVE: tl.constexpr,  # seed_ptr holds splitmix64 states, not seeds (`_row_seed`)
    APPROX: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    ch = tl.program_id(1)
    start = ch * chunk
    end = tl.minimum(start + chunk, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride
    if NOISE == "none":
        top, first = _scan(row_ptr, start, end, 1.0, 0, 0, False, BLOCK, False)
    else:
        inv_temp = tl.load(inv_temp_ptr + row)
        if inv_temp > 0.0:
            seed = _row_seed(seed_ptr, row, advance, DERIVE)
            scale = inv_temp * 1.4426950408889634
            if NOISE == "hash":
                k0, k1 = _keys(seed)
                top, first = _scan(row_ptr, start, end, scale, k0, k1, True, BLOCK, APPROX)
            else:
                top, first = _scan_philox(row_ptr, start, end, vocab, scale, seed, BLOCK, APPROX)
        else:
            top, first = _scan(row_ptr, start, end, 1.0, 0, 0, False, BLOCK, False)
    tl.store(best_val_ptr + row * num_chunks + ch, top)
    tl.store(best_idx_ptr + row * num_chunks + ch, first)


@triton.jit(do_not_specialize=["num_chunks"])
def _pick(best_val_ptr, best_idx_ptr, out_ptr, num_chunks, CHUNKS: tl.constexpr):
    """Each row's token from its chunks' bests: the smallest index among the chunks holding
    the row's best value (chunks are in index order, so that is torch.argmax's first max)."""
    row = tl.program_id(0)
    c = tl.arange(0, CHUNKS)
    mask = c < num_chunks
    val = tl.load(best_val_ptr + row * num_chunks + c, mask=mask, other=float("-inf"))
    idx = tl.load(best_idx_ptr + row * num_chunks + c, mask=mask, other=2147483647)
    top = tl.max(val, axis=0)
    tl.store(out_ptr + row, tl.min(tl.where(val == top, idx, 2147483647), axis=0).to(tl.int64))


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """float32 `1 / temperature`, 0 where the temperature is 0 (greedy rows): what the kernel
    scales the logits by. A caller sampling the same rows again keeps it (four kernels less)."""
    inv_temp = torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-6), 0.0)
    return inv_temp.to(torch.float32)


def chunk_size(rows: int, vocab: int, block: int = BLOCK) -> int:
    """Vocabulary entries per program: about `TARGET_PROGRAMS` programs over all rows, at
    least one block each (one row of 151,936 gets 75 programs, 256 rows get 15 chunks each)."""
    per_row = max(1, triton.cdiv(TARGET_PROGRAMS, rows))
    return triton.cdiv(triton.cdiv(vocab, per_row), block) * block


def most_chunks(vocab: int, block: int = BLOCK) -> int:
    """`_pick`'s `CHUNKS`: the most chunks any row count gives (one block each), to a power of
    two. Fixed per vocabulary, so the kernel has one key whatever the batch (with
    `triton.next_power_of_2(num_chunks)` the H200's 1-256 rows of Qwen3-0.6B met four); the
    masked lanes past `num_chunks` change no result."""
    return triton.next_power_of_2(triton.cdiv(vocab, block))


def gumbel_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    seeds: torch.Tensor | None,
    chunk: int | None = None,
    block: int = BLOCK,
    inv_temperature: torch.Tensor | None = None,
    noise: str = NOISE,
    approx_log: bool | None = None,
    states: torch.Tensor | None = None,
    advance: int = 0,
) -> torch.Tensor:
    """One token per row of `logits [rows, vocab]` drawn from `softmax(logits / temperature)`
    (argmax where `temperature` is 0). `temperature` is float32 `[rows]`, `seeds` int64
    `[rows]`, both on the logits' device; `inv_temperature` (`inverse_temperature`'s) replaces
    `temperature` when given. `noise` is "hash" or "philox" (module docstring); `approx_log`
    (default: with "hash"; never in the interpreter) takes `lg2.approx` for the logarithms.
    Returns int64
    `[rows]`. `chunk` (vocabulary entries per program, a multiple of `block`; default
    `chunk_size`'s) and `block` (a power of two, at least 4) are tuning knobs, not semantics.
    No host sync and no shape-dependent host work beyond the chunk size: CUDA-graph safe.

    Instead of `seeds` (pass None), the kernel derives each row's seed from int64 `states`
    `[rows]` (splitmix64 states, uint64 bits) advanced by `advance` steps, `0 <= advance <
    2^31`: `mix64(states + advance * 0x9E3779B97F4A7C15) & (2^63 - 1)` (`_row_seed`), so a
    caller whose seeds move one splitmix64 step per draw uploads its states once, not seeds
    every draw. Every `advance` shares one compiled kernel; being a launch argument, it is
    what a captured CUDA graph replays (a caller capturing this advances `states` instead)."""
    if noise not in NOISES:
        raise ValueError(f"gumbel noise must be one of {NOISES}, not {noise!r}")
    if (seeds is None) == (states is None):
        raise ValueError("gumbel_sample takes either seeds or states")
    if not 0 <= advance < 2**31:  # an int32 argument: one kernel key
        raise ValueError(f"advance {advance} is not in [0, 2^31)")
    if inv_temperature is None:
        inv_temperature = inverse_temperature(temperature)
    if approx_log is None:
        approx_log = noise == "hash"
    approx_log = approx_log and not _interpreting()  # inline PTX has no CPU interpretation
    if states is not None:
        return _launch(logits, inv_temperature, states, noise, approx_log, chunk, block, advance)
    return _launch(logits, inv_temperature, seeds, noise, approx_log, chunk, block)


def argmax(logits: torch.Tensor, chunk: int | None = None, block: int = BLOCK) -> torch.Tensor:
    """`logits.argmax(-1)` (int64, the first maximum; NaN is skipped where torch would pick
    it) by the same kernel without noise: chunked over the vocabulary, at the memory's pace."""
    return _launch(logits, None, None, "none", False, chunk, block)


def _launch(
    logits, inv_temperature, seeds, noise, approx_log, chunk, block, advance=None
) -> torch.Tensor:
    """Both kernels; `seeds` are splitmix64 states to advance by `advance` unless it is None."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    chunk = chunk or chunk_size(rows, vocab, block)
    if chunk % block:
        raise ValueError(f"chunk {chunk} is not a multiple of block {block}")
    num_chunks = triton.cdiv(vocab, chunk)
    best_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    _chunk_best[(rows, num_chunks)](
        logits,
        logits.stride(0),
        inv_temperature,
        seeds,
        advance or 0,
        best_val,
        best_idx,
        vocab,
        chunk,
        num_chunks,
        NOISE=noise,
        DERIVE=advance is not None,
        APPROX=approx_log,
        BLOCK=block,
        num_warps=max(1, min(8, block // 256)),
    )
    _pick[(rows,)](
        best_val, best_idx, tokens, num_chunks, CHUNKS=most_chunks(vocab, block), num_warps=1
    )
    return tokens


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
