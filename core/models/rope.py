"""Rotary position embedding, computed exactly the way transformers computes it.

The cos/sin tables are float32 (positions times inverse frequencies, then cos/sin), one row per
position up to the model's length, and cast to the activation dtype per step; this keeps the
numerics bit-compatible with HF's `LlamaRotaryEmbedding` in float32. With fused kernels on,
`rotate_in_place` applies the same rotation with one Triton kernel (`pegboard.core.kernels`),
from the float32 tables directly.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from pegboard.core.models.config import RopeConfig
from torch import nn


def inverse_frequencies(rope: RopeConfig, head_dim: int, device: torch.device) -> torch.Tensor:
    """HF's `inv_freq` for the default, linear and llama3 rope types (float32, `[head_dim/2]`)."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (rope.theta**exponents)
    if rope.type == "linear":
        return inv_freq / rope.factor
    if rope.type == "llama3":
        return _llama3_scaling(inv_freq, rope)
    return inv_freq


def _llama3_scaling(inv_freq: torch.Tensor, rope: RopeConfig) -> torch.Tensor:
    # Llama 3.1: long wavelengths are divided by `factor`, short ones kept, the band between
    # interpolated smoothly.
    old_len = rope.original_max_position_embeddings
    low_freq_wavelen = old_len / rope.low_freq_factor
    high_freq_wavelen = old_len / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (old_len / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """`[x1, x2] -> [-x2, x1]` over the last dimension (the NeoX/HF rotary layout)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryEmbedding(nn.Module):
    """Applies rope to q and k by position, from float32 cos/sin tables `[max_len, head_dim]`."""

    def __init__(self, rope: RopeConfig, head_dim: int, max_len: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        self.max_len = max_len
        self.register_buffer("cos", torch.empty(max_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_len, head_dim), persistent=False)
        self.kernel: Callable | None = None  # the fused Triton kernel, when switched on
        self.store_kernel: Callable | None = None  # ... that also stores K/V (`rotate_and_store`)
        self.reset_tables()

    def set_fused_kernels(self, enabled: bool) -> None:
        if enabled:
            from pegboard.core.kernels.rotary import rotary_embedding
            from pegboard.core.kernels.rotary_store import rotary_store_kv

            self.kernel, self.store_kernel = rotary_embedding, rotary_store_kv
        else:
            self.kernel = self.store_kernel = None

    def reset_tables(self) -> None:
        """(Re)compute the tables on the buffers' device (after `to_empty` materialised them)."""
        device = self.cos.device
        if device.type == "meta":
            return
        inv_freq = inverse_frequencies(self.rope, self.head_dim, device)
        positions = torch.arange(self.max_len, device=device).float()
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate `q [T, Hq, D]` and `k [T, Hkv, D]` by `positions [T]`."""
        cos = self.cos[positions].to(q.dtype).unsqueeze(1)
        sin = self.sin[positions].to(q.dtype).unsqueeze(1)
        return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin

    def rotate_in_place(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        """The fused path (after `set_fused_kernels(True)`): rotate `q [T, Hq, D]` and
        `k [T, Hkv, D]`, which may be views of one qkv tensor, in place, RMS-normalising each
        head first with `q_norm` / `k_norm` (Qwen3's per-head `RMSNorm`s) when given."""
        if self.kernel is None:
            raise RuntimeError("rotate_in_place needs set_fused_kernels(True) first")
        if q_norm is None:
            self.kernel(positions, q, k, self.cos, self.sin)
        else:
            self.kernel(
                positions, q, k, self.cos, self.sin, q_norm.weight, k_norm.weight, q_norm.eps
            )

    def rotate_and_store(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        target: tuple,
        q_norm: nn.Module | None = None,
        k_norm: nn.Module | None = None,
    ) -> None:
        """`rotate_in_place`, and the rotated `k` and `v` written into the attention backend's
        pool at `target` (`AttentionBackend.kv_store_target`) in the same kernel
        (`core/kernels/rotary_store.py`; needs `set_fused_kernels(True)` first)."""
        if self.store_kernel is None:
            raise RuntimeError("rotate_and_store needs set_fused_kernels(True) first")
        k_cache, v_cache, slots, k_scale, v_scale = target
        norm = () if q_norm is None else (q_norm.weight, k_norm.weight, q_norm.eps)
        self.store_kernel(
            positions, q, k, v, self.cos, self.sin, k_cache, v_cache, slots, k_scale, v_scale,
            *norm,
        )  # fmt: skip
