"""Sampling by the Gumbel-max trick in one pass over the logits (a Triton kernel).

`argmax(logits / T + G)` with `G` i.i.d. standard Gumbel picks token `i` with probability
`softmax(logits / T)[i]`: the same distribution as drawing from the softmax, without
computing it. The kernel reads each row's logits once and writes one token; the softmax, the
random tensor and their quotient (each a `[rows, vocab]` float32 pass) never exist.

Randomness is counter-based (Philox, `tl.rand4x`: one call gives the noise of four
neighbouring tokens, a quarter of the integer work of one call per token; on the H200 that
took 256 rows of 151,936 from 228 to 220 µs, so Philox is not what bounds the kernel, see
docs/benchmarks.md session 7): row `i`'s noise is a function of its own `seed[i]` and the
token index only, so a request's draw does not depend on what else is in the batch, and giving each draw a fresh seed (the request's seed mixed with how many tokens
it has drawn) makes runs reproduce. Rows with `temperature == 0` add no noise: their token is
the argmax (the first one, as `torch.argmax`).

The grid is (row, vocabulary chunk); each program writes its chunk's best value and index,
and a small reduction over chunks picks each row's token. Importing this module imports
Triton; on a CPU it runs under `TRITON_INTERPRET=1` (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: Vocabulary entries per program: 8 chunks for a 128k vocabulary.
CHUNK = 16384
BLOCK = 2048


@triton.jit
def _noisy(x, cols, u, scale, noisy, vocab, best, best_idx):
    """One lane of a block: `x * scale + G` (G standard Gumbel, in log2 units: the argmax is
    the same as in natural ones since the whole row is scaled by log2(e)) folded into the
    running best value and index."""
    mask = cols < vocab
    e = tl.maximum(-tl.log2(u), 1e-30)  # Exp(1) / ln 2; u == 0 gives +inf: weight 0, never NaN
    gumbel = tl.where(noisy, -tl.log2(e), 0.0)
    v = tl.where(mask, x.to(tl.float32) * scale + gumbel, float("-inf"))
    better = v > best
    return tl.where(better, v, best), tl.where(better, cols, best_idx)


@triton.jit
def _gumbel_argmax_chunk(
    logits_ptr,
    stride,
    inv_temp_ptr,
    seed_ptr,
    best_val_ptr,
    best_idx_ptr,
    vocab,
    num_chunks,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    inv_temp = tl.load(inv_temp_ptr + row)
    seed = tl.load(seed_ptr + row)
    noisy = inv_temp > 0.0
    scale = tl.where(noisy, inv_temp * 1.4426950408889634, 1.0)
    start = chunk * CHUNK
    row_ptr = logits_ptr + row * stride
    # One Philox call gives four uniforms: counter n draws columns 4n .. 4n + 3, so the
    # noise of a column depends on (seed, column) only, whatever CHUNK and BLOCK are.
    QUARTER: tl.constexpr = BLOCK // 4
    best = tl.full([QUARTER], float("-inf"), tl.float32)
    best_idx = tl.zeros([QUARTER], tl.int32)
    for offset in range(0, CHUNK, BLOCK):
        counters = (start + offset) // 4 + tl.arange(0, QUARTER)
        u0, u1, u2, u3 = tl.rand4x(seed, counters)
        cols = counters * 4
        x = tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols, u0, scale, noisy, vocab, best, best_idx)
        x = tl.load(row_ptr + cols + 1, mask=cols + 1 < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols + 1, u1, scale, noisy, vocab, best, best_idx)
        x = tl.load(row_ptr + cols + 2, mask=cols + 2 < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols + 2, u2, scale, noisy, vocab, best, best_idx)
        x = tl.load(row_ptr + cols + 3, mask=cols + 3 < vocab, other=float("-inf"))
        best, best_idx = _noisy(x, cols + 3, u3, scale, noisy, vocab, best, best_idx)
    top = tl.max(best, axis=0)
    # The first index holding the maximum (ties as torch.argmax); a row of -inf gives `start`.
    first = tl.min(tl.where(best == top, best_idx, 2147483647), axis=0)
    first = tl.where(top == float("-inf"), start, first)
    tl.store(best_val_ptr + row * num_chunks + chunk, top)
    tl.store(best_idx_ptr + row * num_chunks + chunk, first)


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """float32 `1 / temperature`, 0 where the temperature is 0 (greedy rows): what the kernel
    scales the logits by. A caller sampling the same rows again keeps it (four kernels less)."""
    inv_temp = torch.where(temperature > 0, 1.0 / temperature.clamp(min=1e-6), 0.0)
    return inv_temp.to(torch.float32)


def gumbel_sample(
    logits: torch.Tensor,
    temperature: torch.Tensor | None,
    seeds: torch.Tensor,
    chunk: int = CHUNK,
    block: int = BLOCK,
    inv_temperature: torch.Tensor | None = None,
) -> torch.Tensor:
    """One token per row of `logits [rows, vocab]` drawn from `softmax(logits / temperature)`
    (argmax where `temperature` is 0). `temperature` is float32 `[rows]`, `seeds` int64
    `[rows]`, both on the logits' device; `inv_temperature` (`inverse_temperature`'s) replaces
    `temperature` when given. Returns int64 `[rows]`. `chunk` (vocabulary entries per program,
    a multiple of `block`) and `block` (a multiple of 4) are tuning knobs (small in tests)."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_chunks = triton.cdiv(vocab, chunk)
    best_val = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    # int64: the kernel's int32 index widens on store, so the result needs no cast kernel.
    best_idx = torch.empty(rows, num_chunks, dtype=torch.int64, device=logits.device)
    if inv_temperature is None:
        inv_temperature = inverse_temperature(temperature)
    _gumbel_argmax_chunk[(rows, num_chunks)](
        logits,
        logits.stride(0),
        inv_temperature,
        seeds,
        best_val,
        best_idx,
        vocab,
        num_chunks,
        CHUNK=chunk,
        BLOCK=block,
        num_warps=8,
    )
    # torch.argmax returns the first maximum, so the earliest chunk wins ties.
    winner = best_val.argmax(dim=1, keepdim=True)
    return best_idx.gather(1, winner).squeeze(1)
