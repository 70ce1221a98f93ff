"""Which kernel multiplies a dense linear layer: `F.linear` by the number of rows of x.

- 1-8 rows (`gemv.MAX_ROWS`): the GEMV kernels where `gemv.DECODE_CONFIGS` has a configuration
  for the weight's shape (`gemv.linear`);
- 9-256 rows (decode batches, small mixed steps): the skinny GEMM where the measured table
  `skinny_gemm_configs.json` has one for this device, shape and row bucket
  (`skinny_gemm.measured_config`);
- otherwise cuBLAS (`F.linear`): prefill, unmeasured shapes, devices without a table
  (`linear_fixed_rows`: at a fixed set of row counts, `fixed_rows`).

The dense layers (`pegboard.core.models.layers.Linear`) call `linear` once the fused kernels
are switched on; a CUDA graph captures whichever kernel its batch size picks.
"""

from __future__ import annotations

import dataclasses

import torch
from pegboard.core.kernels import fixed_rows, gemv, skinny_gemm
from torch.nn import functional as F


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    gate_up: bool = False,
) -> torch.Tensor:
    """`F.linear(x, weight, bias)` through the kernel measured fastest for this many rows; with
    `out` (`[rows of x, N]`: a tensor-parallel projection writing into its symmetric buffer,
    `pegboard.core.distributed.fused_norm`), written there by the GEMV or cuBLAS.

    With `gate_up`, x is a SwiGLU MLP's gate/up output `[..., 2 * K]` for the down projection
    (`takes_gate_up`) and the input is `silu(gate) * up` (`silu_linear`)."""
    if gate_up:
        return silu_linear(x, weight, bias, out)
    rows = gemv.num_rows(x)
    if rows <= gemv.MAX_ROWS or out is not None:
        return gemv.linear(x, weight, bias, out=out)
    if rows <= skinny_gemm.MAX_ROWS:  # prefill's many rows go straight to cuBLAS
        config = skinny_gemm.measured_config(rows, weight)
        if config is not None and weight.is_contiguous():
            return skinny_gemm.skinny_gemm(x, weight, bias, config)
    return F.linear(x, weight, bias)


def linear_fixed_rows(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`linear`, with 2-D `x` of more rows than the skinny GEMM takes multiplied by cuBLAS at
    `fixed_rows.SIZES` rows only (cuBLAS spends host time choosing a kernel for each shape it
    has not met): for a layer that meets irregular row counts (an EAGLE head)."""
    if x.dim() == 2 and x.shape[0] > fixed_rows.MIN_PIECE:
        return fixed_rows.linear_in_pieces(x, weight, bias)
    return linear(x, weight, bias)


def takes_gate_up(rows: int, weight: torch.Tensor) -> bool:
    """Whether `linear` with this weight computes SiLU-and-mul inside its kernel for `rows`
    rows of gate/up (`silu_linear`): where it runs the GEMV (`gemv.DECODE_CONFIGS`)."""
    return _gate_up_config(rows, weight) is not None


#: `shares_silu`'s threshold. Fused, every GEMV program recomputes SiLU for its whole K slice,
#: so the added work is one SiLU per program and K element. H200, 2026-12-01, Llama-3.1-8B
#: batch 1: with 8 output rows per program (TP=2's down shard) fusing won, 387.0 vs 380.6
#: tok/s; with 2 (TP=1's full down projection) it lost, 229.8 vs 242.6.
SHARED_SILU_MIN_BLOCK_N = 8


def shares_silu(rows: int, weight: torch.Tensor) -> bool:
    """`takes_gate_up`, where each GEMV program computes at least `SHARED_SILU_MIN_BLOCK_N`
    output rows from the SiLU it recomputes (`PEGBOARD_FUSED_SILU_DOWN=auto`)."""
    config = _gate_up_config(rows, weight)
    return config is not None and config.block_n >= SHARED_SILU_MIN_BLOCK_N


def _gate_up_config(rows: int, weight: torch.Tensor) -> gemv.GemvConfig | None:
    config = gemv.decode_config(rows, weight)
    return config if config is not None and weight.is_contiguous() else None


def silu_linear(
    gate_up: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`linear(activation.silu_and_mul(gate_up), weight, bias, out)` for `gate_up [..., 2 * K]`:
    where the GEMV takes this many rows (`takes_gate_up`) SiLU-and-mul runs inside it, per K
    block, bit for bit as the separate kernel computes it (one launch fewer per MLP at decode:
    `PEGBOARD_FUSED_SILU_DOWN`, `pegboard.core.models.llama.DecoderMLP`); else separately."""
    config = _gate_up_config(gemv.num_rows(gate_up), weight)
    if config is not None:
        return gemv.gemv(gate_up, weight, bias, config, out=out, gate_up=True)
    from pegboard.core.kernels.activation import silu_and_mul

    return linear(silu_and_mul(gate_up), weight, bias, out)


def silu_gate_up(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor | None:
    """`activation.silu_and_mul(linear(x, weight, bias))` for a SwiGLU gate/up weight
    `[2 * I, K]`, computed in the GEMV's epilogue (`gemv_silu`, bit for bit) where the GEMV
    takes this many rows with an element-wise, unsplit configuration; else None (the caller
    runs the two kernels). `PEGBOARD_FUSED_SILU_GATE_UP`, `pegboard.core.models.llama`."""
    config = _gate_up_config(gemv.num_rows(x), weight)
    if config is None or config.dot or config.split_k > 1 or config.block_n % 2:
        return None
    return gemv.gemv(x, weight, bias, config, silu_out=True)


def norm_linear(
    x: torch.Tensor,
    residual: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    min_block_n: int = 1,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """`(linear(normed, weight, bias), x + residual)` for `normed, _ = norm.rms_norm(x,
    norm_weight, eps, residual)`, in one GEMV launch (`gemv_norm`) where the GEMV takes this
    many rows with an element-wise, unsplit configuration (its block widened to at least
    `min_block_n` output rows per program); else None (the caller runs both kernels).
    `PEGBOARD_FUSED_NORM_GEMV`, `pegboard.core.models.llama.DecoderLayer`."""
    if x.dim() != 2 or x.shape != residual.shape or x.stride(1) != 1 or residual.stride(1) != 1:
        return None
    config = gemv.decode_config(x.shape[0], weight)
    if config is None or config.dot or config.split_k > 1 or not weight.is_contiguous():
        return None
    if config.block_n < min_block_n:
        config = dataclasses.replace(config, block_n=min_block_n)
    from pegboard.core.kernels.gemv_norm import norm_gemv

    return norm_gemv(x, residual, norm_weight, eps, weight, bias, config)
