"""Checkpoint formats of 4-bit weights: their tensor names, packing and zero-point rules.

Each reader turns the tensors of one projection (`[N, K]`: N output rows, K input columns)
into the canonical `Int4Weights` (`w = q * scale + offset`), or into a dense float matrix
when the checkpoint stored that projection unquantized. Every reader checks the tensors it
needs are there with the shapes the config implies, and names the tensor when not.

- GPTQ (`gptq`, AutoGPTQ/GPTQModel): `qweight [K/8, N]` int32 packed along K, `qzeros
  [G, N/8]` packed along N, `scales [G, N]`, `g_idx [K]`; `w = (q - z) * s`, where the
  `gptq` checkpoint format stores `z - 1` (`gptq_v2` stores `z`).
- AWQ GEMM (`awq`): `qweight [K, N/8]`, `qzeros [G, N/8]`, both packed along N in AWQ's
  interleaved order (columns 0 2 4 6 1 3 5 7 in nibbles 0..7), `scales [G, N]`.
- compressed-tensors `pack-quantized` (llm-compressor): `weight_packed [N, K/8]` packed along
  K with values offset by 8, `weight_scale [N, G]`, asymmetric: `weight_zero_point
  [N/8, G]` packed along N (offset by 8), `weight_shape = [N, K]`, optional `weight_g_idx`.
- GGUF Q4_0 / Q4_1 (llama.cpp): blocks of 32 input columns, each an fp16 `d` (Q4_1: and
  `m`) then 16 bytes of nibbles (columns j and j + 16 in the low/high nibble of byte j);
  `w = d * (q - 8)` (Q4_0), `w = d * q + m` (Q4_1). The GGUF reader hands them over raw,
  under the suffixes `gguf_q4_0` / `gguf_q4_1`.
"""

from __future__ import annotations

import torch
from pegboard.plugins.linear.int4 import Int4Weights, unpack_int32
from pegboard.sdk.linear import QuantizationConfig, QuantizationError

AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # the nibble holding column c of each 8
GGUF_BLOCK = 32


class Format:
    """A checkpoint format: the suffixes it reads, and `read` (see the module docstring)."""

    suffixes: tuple[str, ...] = ()

    def read(
        self, name: str, t: dict[str, torch.Tensor], n: int, k: int, quant: QuantizationConfig
    ) -> Int4Weights | torch.Tensor:
        raise NotImplementedError


def _need(name: str, t: dict[str, torch.Tensor], suffix: str, shape: tuple[int, ...] | None):
    if suffix not in t:
        raise QuantizationError(f"missing tensor {name}.{suffix}")
    tensor = t[suffix]
    if shape is not None and tuple(tensor.shape) != shape:
        raise QuantizationError(
            f"tensor {name}.{suffix} has shape {list(tensor.shape)}, expected {list(shape)}"
        )
    return tensor


def _group(quant: QuantizationConfig, k: int, name: str) -> int:
    group = k if quant.group_size in (-1, 0) else quant.group_size
    if k % group:
        raise QuantizationError(f"{name}: group size {group} does not divide its {k} input columns")
    return group


def _dense(name: str, t: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    return _need(name, t, "weight", (n, k)).float()


class GPTQ(Format):
    suffixes = ("qweight", "qzeros", "scales", "g_idx", "weight", "bias")

    def read(self, name, t, n, k, quant):
        if "qweight" not in t and "weight" in t:
            return _dense(name, t, n, k)
        group = _group(quant, k, name)
        g = k // group
        q = unpack_int32(_need(name, t, "qweight", (k // 8, n)), dim=0).t()  # [N, K]
        z = unpack_int32(_need(name, t, "qzeros", (g, n // 8)), dim=1).t().float()  # [N, G]
        if quant.checkpoint_format != "gptq_v2":
            z = (z + 1) % 16  # v1 stores z - 1 (a stored 15 wraps to z = 0)
        s = _need(name, t, "scales", (g, n)).t().float()
        g_idx = t.get("g_idx")
        if g_idx is not None:
            if tuple(g_idx.shape) != (k,):
                raise QuantizationError(f"tensor {name}.g_idx has shape {list(g_idx.shape)}")
            g_idx = g_idx.long()
            if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group):
                g_idx = None
        elif quant.desc_act:
            raise QuantizationError(f"missing tensor {name}.g_idx (desc_act is set)")
        return Int4Weights(q, s, -z * s, group, g_idx)


class AWQ(Format):
    suffixes = ("qweight", "qzeros", "scales", "weight", "bias")

    def read(self, name, t, n, k, quant):
        if "qweight" not in t and "weight" in t:
            return _dense(name, t, n, k)
        group = _group(quant, k, name)
        g = k // group
        order = torch.arange(n).view(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
        q = unpack_int32(_need(name, t, "qweight", (k, n // 8)), dim=1)[:, order].t()
        z = unpack_int32(_need(name, t, "qzeros", (g, n // 8)), dim=1)[:, order].t().float()
        s = _need(name, t, "scales", (g, n)).t().float()
        return Int4Weights(q, s, -z * s, group)


class CompressedTensors(Format):
    suffixes = (
        "weight_packed",
        "weight_scale",
        "weight_zero_point",
        "weight_shape",
        "weight_g_idx",
        "weight",
        "bias",
    )

    def read(self, name, t, n, k, quant):
        if "weight_packed" not in t and "weight" in t:
            return _dense(name, t, n, k)
        shape = _need(name, t, "weight_shape", (2,))
        if [int(x) for x in shape.tolist()] != [n, k]:
            raise QuantizationError(
                f"tensor {name}.weight_shape is {shape.tolist()}, expected {[n, k]}"
            )
        group = _group(quant, k, name)
        g = k // group
        q = unpack_int32(_need(name, t, "weight_packed", (n, k // 8)), dim=1)
        s = _need(name, t, "weight_scale", (n, g)).float()
        if quant.sym:
            z = torch.full_like(s, 8.0)
        else:
            zp = _need(name, t, "weight_zero_point", ((n + 7) // 8, g))
            z = unpack_int32(zp, dim=0)[:n].float()
        g_idx = t.get("weight_g_idx")
        if g_idx is not None:
            g_idx = g_idx.long()
            if torch.equal(g_idx, torch.arange(k, device=g_idx.device) // group):
                g_idx = None
        return Int4Weights(q, s, -z * s, group, g_idx)


class GGUF(Format):
    suffixes = ("gguf_q4_0", "gguf_q4_1", "weight", "bias")

    def read(self, name, t, n, k, quant):
        if "weight" in t:  # another GGUF type, de-quantized by the reader
            return _dense(name, t, n, k)
        kind = "gguf_q4_1" if "gguf_q4_1" in t else "gguf_q4_0"
        block_bytes = 20 if kind == "gguf_q4_1" else 18
        if k % GGUF_BLOCK:
            raise QuantizationError(f"{name}: {k} input columns are not whole GGUF blocks")
        raw = _need(name, t, kind, (n, k // GGUF_BLOCK * block_bytes))
        blocks = raw.reshape(n, k // GGUF_BLOCK, block_bytes)
        d = blocks[..., 0:2].contiguous().view(torch.float16).squeeze(-1).float()
        if kind == "gguf_q4_1":
            m = blocks[..., 2:4].contiguous().view(torch.float16).squeeze(-1).float()
            qs = blocks[..., 4:]
        else:
            m = -8.0 * d
            qs = blocks[..., 2:]
        q = torch.cat([qs & 0xF, qs >> 4], dim=-1).reshape(n, k)  # byte j: columns j, j + 16
        return Int4Weights(q, d, m, GGUF_BLOCK)


FORMATS: dict[str, Format] = {
    "gptq": GPTQ(),
    "awq": AWQ(),
    "compressed-tensors": CompressedTensors(),
    "gguf": GGUF(),
}
