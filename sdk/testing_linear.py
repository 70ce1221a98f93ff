"""Conformance checks of the `linear` slot (`pegboard.sdk.slots.LinearKernel`): exactly the
sentences of its docstring and of `pegboard.sdk.linear`.

    from pegboard.sdk.testing_linear import check_linear
    check_linear(MyLinear)                                  # dense weights
    check_linear(MyInt4, QuantizationConfig("gptq", group_size=128))

On CPU, float32. Each check raises `AssertionError` with the sentence it tested.
"""

from __future__ import annotations

import torch
from pegboard.sdk.linear import LinearLayer, LinearMethod, LinearSpec, QuantizationConfig
from pegboard.sdk.slots import LinearKernel, PluginContext
from pegboard.sdk.types import ModelInfo
from torch.nn import functional as F

_INFO = ModelInfo(
    architecture="LlamaForCausalLM",
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    hidden_size=128,
    vocab_size=256,
    max_model_len=64,
    dtype=torch.float32,
    device=torch.device("cpu"),
)
_SPECS = [
    LinearSpec("model.layers.0.self_attn.qkv_proj", 128, 256,
               {"q_proj": 128, "k_proj": 64, "v_proj": 64}, True),
    LinearSpec("model.layers.0.mlp.down_proj", 256, 128),
]  # fmt: skip


def check_linear(cls: type[LinearKernel], quantization: QuantizationConfig | None = None) -> None:
    """Run every check on a fresh instance of `cls`."""
    assert issubclass(cls, LinearKernel), "a linear plugin derives from LinearKernel"
    if quantization is not None:
        assert quantization.method in cls.formats, (
            f"`formats` lists the quant_method it reads ({quantization.method!r} missing)"
        )
    plugin = cls()
    plugin.setup(PluginContext(_INFO, _INFO.device))
    method = plugin.linear_kernel(model=_INFO, quantization=quantization)
    assert isinstance(method, LinearMethod), "linear_kernel returns a LinearMethod"
    gen = torch.Generator().manual_seed(0)
    for spec in _SPECS:
        layer = method.create(spec)
        assert isinstance(layer, LinearLayer), "create(spec) returns a LinearLayer"
        _fill(layer, spec, gen)
        _check_forward(layer, spec)
        assert isinstance(layer.describe(), str) and layer.describe()
    _check_not_swappable(cls, plugin)


def _fill(layer: LinearLayer, spec: LinearSpec, gen: torch.Generator) -> None:
    if layer.loads_by_parameter:
        weight = getattr(layer, "weight", None)
        assert isinstance(weight, torch.Tensor) and tuple(weight.shape) == (
            spec.out_features,
            spec.in_features,
        ), "a layer loading by parameter names its [out, in] matrix `weight`"
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    else:
        layer.fill_random(gen)


def _check_forward(layer: LinearLayer, spec: LinearSpec) -> None:
    x = torch.randn(5, spec.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = layer(x)
        assert y.shape == (5, spec.out_features) and y.dtype == x.dtype, (
            "forward(x [..., in]) returns [..., out] in x's dtype"
        )
        assert layer(x.view(5, 1, -1)).shape == (5, 1, spec.out_features), (
            "forward keeps x's leading dimensions"
        )
        zero = layer(torch.zeros_like(x))
        y2 = layer(2 * x)
        # x @ W.T + b is affine: f(2x) - f(0) == 2 (f(x) - f(0)).
        torch.testing.assert_close(y2 - zero, 2 * (y - zero), atol=1e-4, rtol=1e-4)
        if layer.loads_by_parameter:
            torch.testing.assert_close(y, F.linear(x, layer.weight, getattr(layer, "bias", None)))


def _check_not_swappable(cls: type[LinearKernel], previous: LinearKernel) -> None:
    other = cls()
    try:
        other.setup(PluginContext(_INFO, _INFO.device), previous=previous)
    except Exception:
        return
    raise AssertionError("setup with a previous plugin raises (the slot is not swappable)")
