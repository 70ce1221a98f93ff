"""The linear slot's per-layer contract: what `linear_kernel` returns and what it builds.

`linear_kernel(model, quantization)` is called once, while the model is built, and returns a
`LinearMethod`. The model asks that method for one `LinearLayer` per projection
(`create(spec)`); the layers are ordinary `torch.nn.Module`s that the decoder calls directly, so
nothing per token goes through pluggy. A layer owns its weight storage (dense, 4-bit packed,
...) and its matmul, and takes its checkpoint tensors itself: it knows their names and packing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn


class QuantizationError(ValueError):
    """A quantized checkpoint this plugin cannot serve (bit width, group size, missing or
    misshapen tensors). The message names the layer or tensor; the loader adds the plugin."""


@dataclass(frozen=True)
class QuantizationConfig:
    """A checkpoint's weight quantization, parsed from `config.json`'s `quantization_config`
    (or `--quantization gguf` for a GGUF file).

    `method` uses SGLang/vLLM's names: `gptq`, `awq`, `compressed-tensors`, `gguf`.
    `group_size` is the number of input columns sharing one scale (-1: one per output row).
    `sym`: zero point fixed at the middle of the range. `desc_act`: GPTQ's activation order
    (a `g_idx` tensor maps input columns to groups). `ignore`: layers kept unquantized.
    `checkpoint_format`: GPTQ's `gptq` (zeros stored minus one) or `gptq_v2`.
    `gguf_file`: the GGUF file holding the weights.
    """

    method: str
    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    checkpoint_format: str = ""
    ignore: tuple[str, ...] = ()
    gguf_file: str | None = None


@dataclass(frozen=True)
class LinearSpec:
    """One projection of the model, as the model asks for it.

    - `name`: the module path (`model.layers.3.self_attn.qkv_proj`), used in messages.
    - `in_features`, `out_features`: the full (unsharded) matrix `y = x @ W.T`.
    - `shards`: checkpoint projections stacked along the output dimension, in order, with
      their output sizes (`{"q_proj": 2048, "k_proj": 512, "v_proj": 512}`); None for a
      layer stored under its own name.
    - `bias`: whether the layer adds a bias.
    - `dtype`, `device`: activations' dtype and the device the weights live on.
    - `parallel`, `tp_rank`, `tp_size`: tensor parallelism. `"column"`: this rank holds
      rows `[rank * n / size, (rank + 1) * n / size)` of every shard's output; `"row"`: it
      holds that slice of the input columns (its caller all-reduces). `"none"` with size 1
      is what every built-in layer supports today; a layer that cannot shard raises
      `QuantizationError` for other values.
    """

    name: str
    in_features: int
    out_features: int
    shards: dict[str, int] | None = None
    bias: bool = False
    dtype: torch.dtype = torch.float32
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    parallel: str = "none"
    tp_rank: int = 0
    tp_size: int = 1

    @property
    def shard_sizes(self) -> dict[str, int]:
        """`shards`, or the layer's own last name component holding all output rows."""
        if self.shards is not None:
            return dict(self.shards)
        return {self.name.rpartition(".")[2]: self.out_features}


class LinearLayer(nn.Module):
    """One projection's weights and matmul: `forward(x [..., in]) -> [..., out]` in `x`'s dtype.

    Loading. A layer whose class sets `loads_by_parameter = True` exposes its checkpoint
    tensors as parameters named as in the checkpoint (`weight`, `bias`; merged shards as row
    ranges the core fills). Any other layer receives, for every checkpoint tensor named
    `<parent>.<shard>.<suffix>` with `suffix` in `tensor_suffixes`, one
    `load_tensor(shard, suffix, tensor)` call, then one `finish_loading()` after the whole
    checkpoint was read: it checks that every tensor it needs arrived (raising
    `QuantizationError` naming the tensor otherwise), and converts them into the layout its
    kernel streams. With `--load-format dummy` it gets `fill_random(generator)` instead.

    `set_fused_kernels(enabled)` switches between the device kernels and the portable
    PyTorch path (the oracle); `describe()` says in a few words how the layer stores and
    multiplies (shown once at load when it fell back from the fast path).
    """

    loads_by_parameter: ClassVar[bool] = False
    tensor_suffixes: tuple[str, ...] = ()
    spec: LinearSpec

    def load_tensor(self, shard: str, suffix: str, tensor: torch.Tensor) -> None:
        raise NotImplementedError

    def finish_loading(self) -> None:
        """Default: nothing to convert."""

    def fill_random(self, generator: torch.Generator) -> None:
        raise NotImplementedError

    def set_fused_kernels(self, enabled: bool) -> None:
        """Default: one path only."""

    def describe(self) -> str:
        return type(self).__name__


class LinearMethod:
    """What `linear_kernel` returns: a factory of `LinearLayer`s, one per projection, called
    while the model is built (never per step)."""

    def create(self, spec: LinearSpec) -> LinearLayer:
        raise NotImplementedError
