"""The `bf16` linear plugin: dense weights in the model's dtype (bf16/fp16 on GPU, fp32 on CPU),
multiplied by cuBLAS or, for decode's row counts, by the GEMV / skinny GEMM kernels that
`pegboard.core.kernels.dense` picks (`pegboard.core.models.layers.Linear`)."""

from __future__ import annotations

from pegboard.core.models.layers import Linear, MergedLinear
from pegboard.sdk.linear import LinearLayer, LinearMethod, LinearSpec, QuantizationConfig
from pegboard.sdk.slots import LinearKernel
from pegboard.sdk.types import ModelInfo


class DenseMethod(LinearMethod):
    """Builds `Linear` (or `MergedLinear` for stacked shards) layers."""

    def create(self, spec: LinearSpec) -> LinearLayer:
        if spec.tp_size != 1 or spec.parallel != "none":
            raise NotImplementedError(f"{spec.name}: tensor-parallel dense layers (not built yet)")
        if spec.shards is not None:
            layer = MergedLinear(spec.in_features, spec.shards, spec.bias)
        else:
            layer = Linear(spec.in_features, spec.out_features, bias=spec.bias)
        layer.spec = spec
        return layer


class BF16Linear(LinearKernel):
    """Dense, unquantized weights (the default for unquantized checkpoints)."""

    formats = ()

    def linear_kernel(
        self, model: ModelInfo, quantization: QuantizationConfig | None
    ) -> LinearMethod:
        return DenseMethod()
