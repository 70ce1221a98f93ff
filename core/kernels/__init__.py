"""Fused Triton kernels of the decoder's small element-wise ops (issue 5).

Each replaces a few PyTorch ops that would each read and write the activations once, and
matches that PyTorch op's numerics (the model's unfused path, `pegboard.core.models.layers` /
`rope`): it computes in float32 and rounds to the activation dtype where the PyTorch op does.

- `norm.rms_norm(x, weight, eps, residual=None)` — RMSNorm of each row (HF `LlamaRMSNorm`:
  normalise in float32, cast, then scale). With `residual` it first adds it (SGLang/vLLM's
  fused add + norm) and returns `(normed, new_residual)`, `new_residual = x + residual`
  rounded to the activation dtype exactly as the unfused `x + residual` rounds it.
- `activation.silu_and_mul(gate_up)` — `silu(gate) * up` over the fused `[T, 2 * I]`
  gate/up projection, in one pass, to a new `[T, I]` tensor. With `PEGBOARD_FUSED_SILU_DOWN=1`
  (`fused_silu_down`) the down projection's GEMV computes it instead (`dense.silu_linear`), bit
  for bit the same, one launch fewer per layer at decode; with `PEGBOARD_FUSED_SILU_GATE_UP=1`
  (`fused_silu_gate_up`) the gate/up GEMV's epilogue does (`dense.silu_gate_up`, `gemv_silu`),
  without recomputing SiLU.
- `rotary.rotary_embedding(positions, q, k, cos, sin, ...)` — rope (NeoX/HF rotate-half
  layout, float32 cos/sin tables, int64 positions) applied to q and k in place, so it works on
  the q/k views of the fused qkv projection's output; with q/k norm weights (Qwen3) each head
  is RMS-normalised first, in the same pass.
- `rotary_store.rotary_store_kv(positions, q, k, v, cos, sin, k_cache, v_cache, slots, ...)`
  — the rope above, and the rotated k and v written into the attention backend's paged pool
  (`AttentionBackend.kv_store_target`) in the same launch: the bytes of rope + the `triton`
  backend's `store_kv`, one launch fewer per layer; on by default, `PEGBOARD_FUSED_ROPE_STORE=0`
  (`fused_rope_store`) switches it off.
- `gemv.linear(x, weight, bias)` — `F.linear` for up to `gemv.MAX_ROWS` rows (decode), as a
  matrix-vector kernel that streams the weight faster than cuBLAS where that was measured
  (`gemv.DECODE_CONFIGS`), else `F.linear` itself. It sums in float32 in another order than
  cuBLAS, so it matches `F.linear` to rounding, not bit for bit. `PEGBOARD_DISABLE_GEMV=1`
  (`gemv_disabled`) keeps `F.linear` while the other kernels stay on.
- `gemv_norm.norm_gemv(x, residual, norm_weight, eps, weight, bias, config)` — the residual
  add and RMSNorm inside the GEMV that follows them (qkv, gate/up at decode): the GEMV of the
  normalised `x + residual` and that sum, in one launch, equal to the separate kernels to
  rounding (the normalised row is not rounded to the activation dtype). Off by default,
  `PEGBOARD_FUSED_NORM_GEMV=1` (or a row count per program, `fused_norm_gemv`) switches it on
  where `dense.norm_linear` finds an element-wise, unsplit GEMV configuration.
- `skinny_gemm.skinny_gemm(x, weight, bias, config)` — `F.linear` for decode batches of 9-256
  rows on tensor cores with small tiles and split K, where the measured table
  `skinny_gemm_configs.json` (or `PEGBOARD_SKINNY_GEMM_CONFIGS`) beat cuBLAS on this device;
  same numerics as the GEMV. `dense.linear(x, weight, bias)` picks among GEMV, skinny GEMM and
  `F.linear` by rows (what the dense linear layers call).
- `fused_moe.fused_experts(hidden, topk_ids, topk_weights, w13, w2)` — a MoE layer's routed
  experts as grouped GEMMs over expert-sorted (token, expert) pairs (SiLU-and-mul and the
  routing weight fused in), selected by `--moe-kernel` (`pegboard.core.moe.kernel`); it sums in
  float32 like the PyTorch path but rounds once after SiLU-and-mul, so it matches it to
  rounding. It does not launch with PDL.
- `w4a16.w4a16_linear(x, qweight, scales, offsets, group_size, bias)` — `x @ W.T` for 4-bit
  weights in the `w4a16` linear plugin's serving layout (kernels in `w4a16_kernels.py`: tensor
  cores at every row count, scales applied to the dot's sums; launch configurations from the
  measured `w4a16_configs.json`). Its split-K fix-up keeps one zeroed counter buffer per device.
- `w4a16_gemlite.gemlite_linear(x, qweight, scales, zeros, group_size, fma, bias)` — the same
  product through gemlite's kernels (optional package, CUDA only; `--w4a16-kernel`), weights in
  gemlite's layout (`plugins/linear/gemlite_layout.py`); `prepare` fills its launch
  configurations per layer shape before the first call (no autotuning, none inside a graph
  capture). It does not launch with PDL; its atomics-summing kernels write float32,
  rounded once to x's dtype.
- `w4a16_tinygemm.tinygemm_linear(x, qweight, scales_and_zeros, group_size, bias)` — the same
  product through PyTorch's own int4 kernel (`torch._weight_int4pack_mm`, bf16 only), weights
  in its layout (`plugins/linear/tinygemm_layout.py`); the `w4a16` plugin calls it for up to
  `MAX_ROWS` rows of x (`--w4a16-kernel tinygemm`, and `auto` where marlin cannot). Not Triton:
  `unavailable_reason` and its shape checks import nothing.

On Hopper GPUs every kernel here launches with programmatic dependent launch (`pdl`: it starts
while the kernel before finishes and waits only where it reads that kernel's outputs);
`PEGBOARD_DISABLE_PDL=1` launches them plainly.

The kernels never synchronise with the host and allocate only their outputs, so a decode step
that uses them can be captured in a CUDA graph. Importing a submodule imports Triton;
`unavailable_reason` says, without importing it, whether they can run on a device. Without a
GPU they run in Triton's CPU interpreter when `TRITON_INTERPRET=1` is set before that import
(tests).
"""

from __future__ import annotations

import importlib.util
import os

import torch


def unavailable_reason(device: torch.device) -> str | None:
    """Why the fused kernels cannot run on `device` (None if they can): they need a CUDA device
    and Triton."""
    if device.type != "cuda":
        return f"the model is on {device.type}; fused kernels need a CUDA device"
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    return None


def gemv_disabled() -> bool:
    """Whether `PEGBOARD_DISABLE_GEMV` (set and not "0") keeps the linear layers on `F.linear`
    when the other fused kernels are switched on (read when they are switched on)."""
    return os.environ.get("PEGBOARD_DISABLE_GEMV", "0") not in ("", "0")


def fused_silu_down() -> str:
    """`PEGBOARD_FUSED_SILU_DOWN` (read when the fused kernels are switched on): whether the
    MLPs' down projections compute SiLU-and-mul inside their GEMV at decode
    (`dense.silu_linear`). "0": never; "1": wherever the GEMV takes the rows
    (`dense.takes_gate_up`); "auto" (default): only where each GEMV program shares its SiLU
    work over enough output rows to pay (`dense.shares_silu`)."""
    value = os.environ.get("PEGBOARD_FUSED_SILU_DOWN", "auto")
    return "0" if value in ("", "0") else "auto" if value == "auto" else "1"


def fused_rope_store() -> bool:
    """`PEGBOARD_FUSED_ROPE_STORE` (read when the fused kernels are switched on; on unless "0"
    or empty: on the H200 it gave +0.7 % on the nano-vllm workload and +0.8 % on Llama-3.1-8B
    batch 1, session 19): whether each attention layer's rope kernel also writes the step's
    K/V into the pool (`rotary_store`) where the attention backend offers it
    (`AttentionBackend.supports_fused_kv_store`), instead of the backend's own store kernel."""
    return os.environ.get("PEGBOARD_FUSED_ROPE_STORE", "1") not in ("", "0")


def fused_norm_gemv() -> int:
    """`PEGBOARD_FUSED_NORM_GEMV` (read when the fused kernels are switched on; off by default
    until measured on the GPU): 0 (off), or the fewest output rows per GEMV program with which
    the decoder's residual add + RMSNorm run inside the qkv and gate/up GEMVs at decode
    (`dense.norm_linear`, `gemv_norm`): "1" keeps each shape's measured block, "8" widens
    narrower ones to 8 rows, so each program's norm work serves more outputs."""
    value = os.environ.get("PEGBOARD_FUSED_NORM_GEMV", "0")
    try:
        return max(0, int(value or 0))
    except ValueError:
        raise ValueError(f"PEGBOARD_FUSED_NORM_GEMV={value!r}: 0, 1 or a row count") from None


def fused_silu_gate_up() -> bool:
    """`PEGBOARD_FUSED_SILU_GATE_UP` (read when the fused kernels are switched on; off by
    default until measured on the GPU): whether the MLPs' gate/up GEMV computes SiLU-and-mul
    in its epilogue at decode (`dense.silu_gate_up`, `gemv_silu`), one launch fewer per layer."""
    return os.environ.get("PEGBOARD_FUSED_SILU_GATE_UP", "0") not in ("", "0")
