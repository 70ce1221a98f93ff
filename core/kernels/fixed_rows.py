"""Dense linears of any row count through cuBLAS at a fixed set of row counts.

cuBLAS chooses its kernel for a GEMM shape on the host the first time it meets the shape, and
caches the choice. On the H200 (torch 2.11, CUDA 13; `scripts/probe_linear_shapes.py`,
session 19) the five linears of an EAGLE-3 layer at a row count seen before took 0.2-0.6 ms
with the device synchronized around each, at a new row count 1-7 ms: ~0.2-1.4 ms of host work
per new shape, far more than the kernels. An EAGLE head's eager catch-up (the pairs a request
decoded while the head was off) meets a new row count nearly every time, and paid it in every
probe of a large batch (`core/speculative/switch.py`).

`linear_in_pieces` multiplies more than `MIN_PIECE` rows in pieces of `SIZES` rows only: whole
`MAX_PIECE` pieces, then the binary decomposition of what is left down to `MIN_PIECE`, and a
remainder under `MIN_PIECE` as one more `MIN_PIECE` piece ending at the last row (it recomputes
rows the piece before it wrote: same stream, so in order, and every row is one GEMM's result).
Each piece writes its rows of one output tensor (`torch.mm` / `torch.addmm` with `out=`: no
copies). `warm_up` meets every size once per weight shape, so no later call meets a new one.
`dense.linear_fixed_rows` routes its cuBLAS products here (fewer rows go to the GEMV and
skinny GEMM: Triton kernels specialize by divisibility, not by row count).

The cost: up to ~log2(rows / MIN_PIECE) + 2 launches instead of one, the smaller pieces using
the device less well. It runs for an EAGLE head's linears (on CUDA), not for the target model's:
tried there for prefill and mixed steps (`PEGBOARD_FIXED_ROWS=1`, session 19: `bench serve`,
Qwen3-0.6B, Poisson arrivals, prompts of 300-2,000 tokens), TTFT went from 13.2 / 14.4 ms to
16.1 / 14.2 and ITL from 1.47 / 1.64 to 1.82 / 1.56: the extra launches cost what the new
shapes did, so the switch was removed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MIN_PIECE = 256  # (`skinny_gemm.MAX_ROWS`: fewer rows go to the GEMV or skinny GEMM)
MAX_PIECE = 8192
#: The only row counts `linear_in_pieces` hands cuBLAS.
SIZES = tuple(MIN_PIECE << i for i in range((MAX_PIECE // MIN_PIECE).bit_length()))


def pieces(rows: int) -> list[tuple[int, int]]:
    """`(first row, rows)` of each GEMM covering `rows` (more than `MIN_PIECE`) rows, every
    count one of `SIZES`."""
    if rows <= MIN_PIECE:
        raise ValueError(f"{rows} rows: pieces are for more than {MIN_PIECE}")
    out, start = [], 0
    while rows - start >= MAX_PIECE:
        out.append((start, MAX_PIECE))
        start += MAX_PIECE
    for size in reversed(SIZES[:-1]):  # the binary digits of what is left
        if rows - start >= size:
            out.append((start, size))
            start += size
    if start < rows:
        out.append((rows - MIN_PIECE, MIN_PIECE))
    return out


def linear_in_pieces(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` for 2-D `x` of more than `MIN_PIECE` rows as cuBLAS GEMMs of
    `SIZES` rows only (`pieces`); `F.linear` itself where autograd records (`out=` takes no
    gradient)."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return F.linear(x, weight, bias)
    rows = x.shape[0]
    x = x.contiguous()
    out = x.new_empty(rows, weight.shape[0])
    w = weight.t()
    for start, n in pieces(rows):
        part = out[start : start + n]
        if bias is None:
            torch.mm(x[start : start + n], w, out=part)
        else:
            torch.addmm(bias, x[start : start + n], w, out=part)
    return out


#: `(shape, dtype, device, has bias)` of the weights `warm_up` has met every size for.
_warm: set[tuple] = set()


@torch.no_grad()
def warm_up(layers: list[tuple[torch.Tensor, torch.Tensor | None]]) -> None:
    """Meet every piece size once for each `(weight, bias)` shape of `layers` not met before
    in this process (cuBLAS keeps its choices process-wide), so that `linear_in_pieces`
    never hands cuBLAS a shape it has not chosen a kernel for."""
    for weight, bias in layers:
        key = (tuple(weight.shape), weight.dtype, weight.device, bias is not None)
        if key in _warm:
            continue
        _warm.add(key)
        x = weight.new_zeros(MAX_PIECE, weight.shape[1])
        for size in SIZES:
            linear_in_pieces(x[: size + (1 if size == MIN_PIECE else 0)], weight, bias)
