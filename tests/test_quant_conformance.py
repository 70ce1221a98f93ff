"""The built-in linear plugins pass the linear slot's conformance kit, and the kit catches a
plugin that breaks the contract."""

from __future__ import annotations

import pytest
from pegboard.plugins.linear.bf16 import BF16Linear, DenseMethod
from pegboard.plugins.linear.w4a16 import W4A16Linear
from pegboard.sdk.linear import QuantizationConfig
from pegboard.sdk.testing import check_linear


def test_bf16_conforms():
    check_linear(BF16Linear)


@pytest.mark.parametrize("method", ["gptq", "awq", "compressed-tensors", "gguf"])
def test_w4a16_conforms_for_every_format(method):
    check_linear(W4A16Linear, QuantizationConfig(method, group_size=32 if method == "gguf" else 64))


class SquaringMethod(DenseMethod):
    """Not a matmul: squares the output."""

    def create(self, spec):
        layer = super().create(spec)
        forward = layer.forward
        layer.forward = lambda x: forward(x) ** 2
        return layer


class Squaring(BF16Linear):
    def linear_kernel(self, model, quantization):
        return SquaringMethod()


class Swappable(BF16Linear):
    def setup(self, ctx, previous=None):
        pass


def test_the_kit_catches_a_layer_that_is_not_linear():
    with pytest.raises(AssertionError):
        check_linear(Squaring)


def test_the_kit_catches_a_swappable_linear_plugin():
    with pytest.raises(AssertionError, match="not swappable"):
        check_linear(Swappable)


def test_the_kit_checks_the_plugin_reads_the_format():
    with pytest.raises(AssertionError, match="formats"):
        check_linear(BF16Linear, QuantizationConfig("gptq"))


def test_w4a16_on_an_unquantized_checkpoint_says_so():
    from pegboard.sdk.linear import QuantizationError

    with pytest.raises(QuantizationError, match="needs a quantized checkpoint"):
        W4A16Linear().linear_kernel(model=None, quantization=None)
