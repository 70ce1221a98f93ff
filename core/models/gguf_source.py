"""A GGUF file (llama.cpp) read as if it were a safetensors checkpoint of HF tensor names.

Q4_0 / Q4_1 projections are handed over raw (their blocks, one row per output row) under the
suffixes `gguf_q4_0` / `gguf_q4_1`, for the `w4a16` plugin to unpack; every other type (the
F32 norms, SmolLM2's Q8_0 embedding, K-quants) is de-quantized here with the `gguf` package
and named `weight`. llama.cpp stores Llama's q/k projections with their rows permuted for its
rope layout; rows are whole blocks, so the permutation is undone on the raw blocks.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from pegboard.core.models.config import ModelConfig
from pegboard.core.models.errors import ModelLoadError

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_RAW_TYPES = {"Q4_0": "gguf_q4_0", "Q4_1": "gguf_q4_1"}


class _Shape:
    def __init__(self, shape: tuple[int, ...]) -> None:
        self.shape = shape

    def get_shape(self) -> list[int]:
        return list(self.shape)


class GGUFSource:
    """`keys()`, `get_slice(name).get_shape()` and `get_tensor(name)` over a GGUF file, with
    HF names (what `pegboard.core.models.weights` reads from safetensors handles)."""

    def __init__(self, path: Path, cfg: ModelConfig, device: torch.device) -> None:
        import gguf

        self.path = path
        self.device = device
        self.cfg = cfg
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:
            raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from e
        self.tensors = {}
        for t in self.reader.tensors:
            name = _hf_name(t.name)
            if name is None:
                raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name!r}")
            kind = _RAW_TYPES.get(t.tensor_type.name)
            if kind is not None:
                name = f"{name.rpartition('.')[0]}.{kind}"
            self.tensors[name] = t

    def keys(self) -> list[str]:
        return list(self.tensors)

    def get_slice(self, name: str) -> _Shape:
        t = self.tensors[name]
        return _Shape(tuple(int(x) for x in t.data.shape) if name.endswith(
            tuple(_RAW_TYPES.values())
        ) else tuple(int(x) for x in reversed(t.shape.tolist())))  # fmt: skip

    def get_tensor(self, name: str) -> torch.Tensor:
        import gguf

        t = self.tensors[name]
        if name.endswith(tuple(_RAW_TYPES.values())):
            data = np.ascontiguousarray(t.data)
        else:
            data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            data = data.reshape(tuple(reversed(t.shape.tolist())))
        data = self._unpermute(name, data)
        return torch.from_numpy(np.array(data, copy=True)).to(self.device)

    def _unpermute(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Undo llama.cpp's q/k row permutation (its converter's `permute`)."""
        if self.cfg.architecture not in ("LlamaForCausalLM", "MistralForCausalLM"):
            return rows
        if ".self_attn.q_proj." in name:
            heads = self.cfg.num_heads
        elif ".self_attn.k_proj." in name:
            heads = self.cfg.num_kv_heads
        else:
            return rows
        n = rows.shape[0]
        rest = rows.shape[1:]
        return rows.reshape(heads, n // heads // 2, 2, *rest).swapaxes(1, 2).reshape(n, *rest)


def _hf_name(gguf_name: str) -> str | None:
    base, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if m:
        mapped = _LAYER_NAMES.get(m.group(2))
        return f"model.layers.{m.group(1)}.{mapped}.{suffix}" if mapped else None
    mapped = _TOP_NAMES.get(base)
    return f"{mapped}.{suffix}" if mapped else None
