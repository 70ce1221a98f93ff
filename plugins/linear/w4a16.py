"""The `w4a16` linear plugin: 4-bit weights, 16-bit activations.

It reads GPTQ (sym/asym, `desc_act`), AWQ (GEMM), compressed-tensors `pack-quantized` and GGUF
Q4_0/Q4_1 checkpoints (`formats.py`), converts every projection to one serving layout
(`int4.py`) and multiplies on CUDA with pegboard's Triton W4A16 kernels
(`pegboard.core.kernels.w4a16`) or gemlite's (`pegboard.core.kernels.w4a16_gemlite`, option
`--w4a16-kernel`; its layout is made from the serving one at load, `gemlite_layout.py`), or, on
CPU and as the oracle, by de-quantizing then `F.linear`.

With `--w4a16-kernel tinygemm` (and `auto` where marlin cannot take a layer; tinygemm runs on
CUDA, bf16) calls of at most `w4a16_tinygemm.MAX_ROWS` rows of x (decode at small batch) go to
PyTorch's own int4 kernel
(`pegboard.core.kernels.w4a16_tinygemm`, layout made at load by `tinygemm_layout.py`) and larger
ones to pegboard's Triton kernels, so such a layer holds both layouts: its 4-bit weights twice
(~1.06 bytes per weight at group 128 instead of 0.53; bf16 is 2). CUDA graphs are captured per
batch size, so which kernel a captured call runs is fixed per graph.

With `--w4a16-kernel marlin` (CUDA, bf16) calls of at most `w4a16_marlin.PLUGIN_MAX_ROWS` (32)
rows go to pegboard's Marlin-style CUDA kernel (`pegboard.core.kernels.w4a16_marlin`, compiled
with NVRTC at load; layout made at load by `marlin_layout.py`) and larger ones to the Triton
kernels. Each layer runs the configuration measured best for its shape and rows (1-8 rows, 9-16,
17-32: `w4a16_marlin.layer_config`; a layer no configuration takes at 17-32 rows stops at 16).
The bias is added after the kernel's bf16 rounding, as for tinygemm. Such a layer also holds both layouts: ~1.09 bytes per weight at group 128 (Marlin's
0.5 + float32 scale and zero per group, 0.06, beside the serving 0.53); a layer whose K is split
across blocks (fewer row blocks than multiprocessors) keeps its float32 partial sums
(`marlin_partials`, splits x 32 x N) so that a call allocates nothing but its output. `auto`
runs marlin where it can take a layer, tinygemm where not (`AUTO_PREFERS_MARLIN`: marlin is
faster end to end on the H200).

Calls of at least `--w4a16-dequant-min-rows` rows (prefill chunks, decode at large batch; by
default 64 or 128 by the layer's size, `auto_dequant_min_rows`) run neither kernel: the layer
is de-quantized into one bf16 buffer all layers of the model share (`DequantBuffer`, sized at
load for the largest) and multiplied by cuBLAS (`pegboard.core.kernels.w4a16_dequant`), faster
there than pegboard's W4A16 kernels on the H200 (up to 4x at 1,024 rows; the nano-vllm workload
W4A16 18,948 -> 21,905 output tok/s, bf16 24,719).

Per layer fallback: a projection the checkpoint stored unquantized (the LM head, compressed-
tensors' `ignore` list, another GGUF type), stacked shards that do not share one group layout,
or a shape the kernels cannot take, is kept dense; the loader lists such layers once.
"""

from __future__ import annotations

from typing import Literal

import pydantic
import torch
from pegboard.core.kernels import w4a16_marlin, w4a16_tinygemm
from pegboard.core.kernels.w4a16_marlin import MarlinConfig
from pegboard.plugins.linear import marlin_layout
from pegboard.plugins.linear.bf16 import DenseMethod
from pegboard.plugins.linear.formats import FORMATS, Format
from pegboard.plugins.linear.gemlite_layout import (
    GemliteLayout,
    dequantize_gemlite,
    serving_from_plain,
    to_gemlite,
)
from pegboard.plugins.linear.int4 import (
    Int4Weights,
    PackedInt4,
    contiguous_groups,
    dequantize_packed,
    pack,
)
from pegboard.plugins.linear.marlin_layout import MarlinLayout
from pegboard.plugins.linear.tinygemm_layout import TinygemmLayout, to_tinygemm
from pegboard.sdk.linear import (
    LinearLayer,
    LinearMethod,
    LinearSpec,
    QuantizationConfig,
    QuantizationError,
)
from pegboard.sdk.slots import LinearKernel
from pegboard.sdk.types import ModelInfo
from torch.nn import functional as F

SUPPORTED_GROUPS = (-1, 32, 64, 128)
Kernel = Literal["auto", "triton", "gemlite", "tinygemm", "marlin"]
#: What `--w4a16-kernel auto` runs where gemlite imports on CUDA: pegboard's kernels until the
#: H200 has measured gemlite (`device-run.sh w4a16`, docs/kernels.md "gemlite"): session 8 ran
#: out of device time before it could.
AUTO_PREFERS_GEMLITE = False
#: Whether `--w4a16-kernel auto` runs the Marlin kernel (where it runs; tinygemm where it
#: cannot take a layer) instead of tinygemm: on the H200 Llama-3.1-8B W4A16 g128 decodes at
#: batch 1 at 380.4-416.7 tok/s with it, 320.1 with tinygemm (docs/benchmarks.md, sessions 11/13).
AUTO_PREFERS_MARLIN = True
#: Layers of at most this many weights de-quantize from `SMALL_LAYER_DEQUANT_ROWS` rows of x
#: unless `--w4a16-dequant-min-rows` says otherwise, larger ones from `LARGE_LAYER_DEQUANT_ROWS`:
#: where de-quantizing + cuBLAS and the W4A16 kernels crossed on the H200 (session 14,
#: docs/benchmarks.md): Qwen3-0.6B's layers and Llama-3.1-8B's o (16 M weights) at 32-64 rows,
#: Llama-3.1-8B's qkv, gate_up and down (25-117 M) at 64-128 (de-quantizing costs ~0.5-0.7 µs
#: per million weights).
SMALL_LAYER = 16 * 2**20
SMALL_LAYER_DEQUANT_ROWS, LARGE_LAYER_DEQUANT_ROWS = 64, 128


def auto_dequant_min_rows(weights: int) -> int:
    """The rows of x from which a layer of `weights` weights de-quantizes + runs cuBLAS when
    `--w4a16-dequant-min-rows` is not given."""
    return SMALL_LAYER_DEQUANT_ROWS if weights <= SMALL_LAYER else LARGE_LAYER_DEQUANT_ROWS


#: `w4a16_gemlite.self_check`'s verdict per (N, K, group, dtype, form): once per process.
_gemlite_checked: dict[tuple, str | None] = {}


class W4A16Options(pydantic.BaseModel):
    """Options of the `w4a16` linear plugin."""

    model_config = pydantic.ConfigDict(extra="forbid")

    kernel: Kernel = pydantic.Field(
        "auto",
        description="CUDA kernels: triton (pegboard's), gemlite (pip install "
        "'pegboard[gemlite]'), tinygemm (torch's int4 kernel for calls of up to 4 rows, "
        "triton above; bf16 only), marlin (pegboard's Marlin-style CUDA kernel for calls of "
        "up to 32 rows, triton above; bf16 only, compiled with NVRTC), or auto: marlin "
        "where it applies, else tinygemm where it applies, else triton",
    )
    dequant_min_rows: int | None = pydantic.Field(
        None,
        ge=0,
        description="CUDA: calls with at least this many rows of x (prefill chunks, large "
        "decode batches) de-quantize the layer into one bf16 buffer shared by all layers and "
        "run cuBLAS, instead of the W4A16 kernels (0: never; unset: 64 for layers of up to 16 M "
        "weights, 128 for larger ones, as measured on the H200)",
    )


class DequantBuffer:
    """The one buffer a model's W4A16 layers de-quantize into for calls of many rows
    (`pegboard.core.kernels.w4a16_dequant`; one per model, so it goes with the model). Layers
    `reserve` their size when their kernels are chosen at load, before any CUDA graph is
    captured, so a captured call never sees `tensor` replaced; they read `tensor` per call."""

    def __init__(self) -> None:
        self.tensor: torch.Tensor | None = None

    def reserve(self, numel: int, device: torch.device, dtype: torch.dtype) -> None:
        """Grow `tensor` to at least `numel` elements of `dtype` on `device`."""
        if self.tensor is None or self.tensor.numel() < numel:
            self.tensor = torch.empty(numel, device=device, dtype=dtype)


class Int4Linear(LinearLayer):
    """One projection with 4-bit weights (see the module docstring). After `finish_loading`
    it holds either the packed weights (`qweight`, `scales`, `offsets`, `perm`) or, as a
    fallback, a dense `weight` (`fallback` says why). While gemlite's kernels run, `gemlite`
    holds their layout and `qweight` is dropped (rebuilt from it when they are switched off).
    While tinygemm runs the calls of few rows, `tinygemm` holds its layout beside the others;
    the same for the Marlin kernel (`marlin`, its configuration per rows in `marlin_configs`)."""

    def __init__(
        self,
        spec: LinearSpec,
        quant: QuantizationConfig,
        fmt: Format,
        kernel: Kernel = "auto",
        dequant: DequantBuffer | None = None,
        dequant_min_rows: int | None = None,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.quant = quant
        self.format = fmt
        self.tensor_suffixes = fmt.suffixes
        self.group_size = 0
        self.fallback: str | None = None
        self.kernel_choice = kernel
        self.kernel = None
        self.gemlite: GemliteLayout | None = None
        self.gemlite_skipped: str | None = None  # why gemlite was chosen but not used
        self.tinygemm: TinygemmLayout | None = None
        self.tinygemm_skipped: str | None = None  # why tinygemm was chosen but not used
        self.marlin: MarlinLayout | None = None
        self.marlin_configs: tuple[MarlinConfig, ...] = ()  # index: rows of x (0 to 32)
        self.marlin_partials: torch.Tensor | None = None  # split-K sums, where K is split
        self.marlin_skipped: str | None = None  # why marlin was chosen but not used
        if dequant_min_rows is None:
            dequant_min_rows = auto_dequant_min_rows(spec.in_features * spec.out_features)
        #: The model's shared buffer for calls of at least `dequant_min_rows` rows (None: off).
        self.dequant_buffer = dequant if dequant_min_rows > 0 else None
        self.dequant_min_rows = dequant_min_rows
        self.dequant_linear = None  # `w4a16_dequant.dequant_linear` while the kernels run
        self._received: dict[str, dict[str, torch.Tensor]] = {s: {} for s in spec.shard_sizes}
        self.qweight: torch.Tensor | None = None
        self.scales: torch.Tensor | None = None
        self.offsets: torch.Tensor | None = None
        self.perm: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    # ------------------------------------------------------------------ loading

    def load_tensor(self, shard: str, suffix: str, tensor: torch.Tensor) -> None:
        self._received[shard][suffix] = tensor

    def finish_loading(self) -> None:
        parent = self.spec.name.rpartition(".")[0]
        parts = []
        for shard, rows in self.spec.shard_sizes.items():
            name = f"{parent}.{shard}" if parent else shard
            got = self._received[shard]
            parts.append(self.format.read(name, got, rows, self.spec.in_features, self.quant))
        self._set_bias(parent)
        self._received = {}
        self._store(parts)

    def fill_random(self, generator: torch.Generator) -> None:
        n, k = self.spec.out_features, self.spec.in_features
        group = k if self.quant.group_size == -1 else self.quant.group_size
        dev = self.spec.device
        q = torch.randint(0, 16, (n, k), generator=generator, device=dev, dtype=torch.uint8)
        # std of q - 7.5 is 4.6: weights of std ~0.018; 2^-8 and 7.5 x 2^-8 are exact in float16,
        # so the layout is that of a float16-scaled checkpoint (2 + 2 bytes per group)
        scales = torch.full((n, k // group), 2.0**-8, device=dev)
        if self.spec.bias:
            self.bias = torch.zeros(n, dtype=self.spec.dtype, device=dev)
        self._store([Int4Weights(q, scales, -7.5 * scales, group)])

    def _set_bias(self, parent: str) -> None:
        if not self.spec.bias:
            return
        biases = []
        for shard, rows in self.spec.shard_sizes.items():
            b = self._received[shard].get("bias")
            if b is None:
                raise QuantizationError(f"missing tensor {parent}.{shard}.bias")
            if tuple(b.shape) != (rows,):
                raise QuantizationError(f"tensor {parent}.{shard}.bias has shape {list(b.shape)}")
            biases.append(b)
        self.bias = torch.cat(biases).to(self.spec.dtype)

    def _store(self, parts: list[Int4Weights | torch.Tensor]) -> None:
        dtype = self.spec.dtype
        reason = self._dense_reason(parts)
        if reason is None:
            reordered = [contiguous_groups(p, self.spec.name) for p in parts]
            perms = [perm for _, perm in reordered]
            if any(p is None for p in perms) != all(p is None for p in perms) or not all(
                p is None or torch.equal(p, perms[0]) for p in perms
            ):
                reason = "its stacked shards have different activation orders"
        if reason is not None:
            self.fallback = reason
            weights = [p if isinstance(p, torch.Tensor) else p.dequantize() for p in parts]
            self.weight = torch.cat(weights).to(dtype)
            return
        ws = [w for w, _ in reordered]
        merged = Int4Weights(
            torch.cat([w.q for w in ws]),
            torch.cat([w.scales for w in ws]),
            torch.cat([w.offsets for w in ws]),
            ws[0].group_size,
        )
        packed = pack(merged, dtype)
        self.qweight, self.scales, self.offsets = packed.qweight, packed.scales, packed.offsets
        self.group_size = packed.group_size
        self.perm = perms[0]

    def _dense_reason(self, parts: list[Int4Weights | torch.Tensor]) -> str | None:
        if any(isinstance(p, torch.Tensor) for p in parts):
            return "the checkpoint stores it unquantized"
        if len({p.group_size for p in parts}) > 1:
            return "its stacked shards have different group sizes"
        return None

    # ------------------------------------------------------------------ running

    def set_fused_kernels(self, enabled: bool) -> None:
        if self.gemlite is not None:  # back to the serving layout
            self.qweight = serving_from_plain(self.gemlite.qweight)
            self.gemlite = None
        self.kernel = self.dequant_linear = None
        self.tinygemm = self.tinygemm_skipped = None
        self.marlin = self.marlin_partials = self.marlin_skipped = None
        self.marlin_configs = ()
        if not enabled or self.qweight is None:
            return
        auto = self.kernel_choice == "auto"
        if self.kernel_choice == "marlin" or (auto and AUTO_PREFERS_MARLIN):
            self._use_marlin()
        if self.kernel_choice == "tinygemm" or (auto and self.marlin is None):
            self._use_tinygemm()  # before gemlite drops the serving words it is made from
        wants_gemlite = self.kernel_choice == "gemlite" or (
            self.kernel_choice == "auto" and AUTO_PREFERS_GEMLITE
        )
        if wants_gemlite and self._use_gemlite():
            return
        from pegboard.core.kernels import w4a16, w4a16_dequant

        reason = w4a16.unsupported_reason(
            self.spec.out_features, self.spec.in_features, self.group_size
        )
        if reason is not None:
            self.fallback = f"the W4A16 kernels cannot take it ({reason})"
            self.weight = self._dequantized(self.spec.dtype)
            self.qweight = self.scales = self.offsets = self.tinygemm = None
            self.marlin = self.marlin_partials = None
            self.marlin_configs = ()
            return
        self.kernel = w4a16.w4a16_linear
        if self.dequant_buffer is not None:
            numel = self.spec.in_features * self.spec.out_features
            self.dequant_buffer.reserve(numel, self.qweight.device, self.spec.dtype)
            self.dequant_linear = w4a16_dequant.dequant_linear

    def _use_gemlite(self) -> bool:
        """Convert to gemlite's layout and run its kernels, if it can take this layer (else
        `gemlite_skipped` says why, and pegboard's kernels run)."""
        from pegboard.core.kernels import w4a16_gemlite

        n, k = self.spec.out_features, self.spec.in_features
        reason = w4a16_gemlite.unavailable_reason(self.qweight.device, self.spec.dtype)
        reason = reason or w4a16_gemlite.shape_unsupported_reason(n, k, self.group_size)
        if reason is not None:
            self.gemlite_skipped = reason if self.kernel_choice == "gemlite" else None
            return False
        packed = PackedInt4(self.qweight, self.scales, self.offsets, self.group_size, None)
        g = to_gemlite(packed, self.spec.dtype)
        w4a16_gemlite.prepare(n, k, self.group_size, self.spec.dtype)
        key = (n, k, self.group_size, self.spec.dtype, g.fma, g.zeros.dim(), g.scales.dtype)
        if key not in _gemlite_checked:
            weight = dequantize_gemlite(g, self.spec.dtype)
            _gemlite_checked[key] = w4a16_gemlite.self_check(
                g.qweight, g.scales, g.zeros, g.group_size, g.fma, weight
            )
        if _gemlite_checked[key] is not None:
            self.gemlite_skipped = f"its self-check failed: {_gemlite_checked[key]}"
            return False
        self.gemlite = g
        self.qweight = None  # not kept twice (4 bits per weight)
        self.kernel = w4a16_gemlite.gemlite_linear
        return True

    def _use_tinygemm(self) -> None:
        """Make tinygemm's layout for the calls of few rows, if it can take this layer (else
        `tinygemm_skipped` says why, where that is news: not for `auto` off CUDA or bf16)."""
        n, k = self.spec.out_features, self.spec.in_features
        reason = w4a16_tinygemm.unavailable_reason(self.qweight.device, self.spec.dtype)
        if reason is not None:
            self.tinygemm_skipped = reason if self.kernel_choice == "tinygemm" else None
            return
        reason = w4a16_tinygemm.shape_unsupported_reason(n, k, self.group_size)
        if reason is not None:
            self.tinygemm_skipped = reason
            return
        packed = PackedInt4(self.qweight, self.scales, self.offsets, self.group_size, None)
        self.tinygemm = to_tinygemm(packed)

    def _use_marlin(self) -> None:
        """Make the Marlin kernel's layout, pick its configuration per rows and compile them
        now (not inside a CUDA-graph capture), if it can take this layer (else `marlin_skipped`
        says why, where that is news: not for `auto` off CUDA or bf16)."""
        n, k, group = self.spec.out_features, self.spec.in_features, self.group_size
        device = self.qweight.device
        reason = w4a16_marlin.unavailable_reason(device, self.spec.dtype)
        if reason is not None:
            self.marlin_skipped = reason if self.kernel_choice == "marlin" else None
            return
        reason = marlin_layout.shape_unsupported_reason(n, k, group)
        if reason is not None:
            self.marlin_skipped = reason
            return
        tiles = sorted(
            {w4a16_marlin.token_tiles(m) for m in range(1, w4a16_marlin.PLUGIN_MAX_ROWS + 1)}
        )
        by_tiles: dict[int, MarlinConfig] = {}
        for t in tiles:  # as many rows as configurations take (at least 8, else none)
            try:
                config = w4a16_marlin.layer_config(t, n, k, group)
                w4a16_marlin.compiled(config, t, group)
            except (ValueError, w4a16_marlin.CompileError) as e:
                if not by_tiles:
                    self.marlin_skipped = str(e)
                    return
                break
            by_tiles[t] = config
        rows = 8 * max(by_tiles)
        self.marlin_configs = tuple(
            by_tiles[w4a16_marlin.token_tiles(max(m, 1))] for m in range(rows + 1)
        )
        split = max(w4a16_marlin.splits(c, n, k, device) for c in by_tiles.values())
        if split > 1:
            self.marlin_partials = torch.empty(split * rows * n, device=device)
        packed = PackedInt4(self.qweight, self.scales, self.offsets, group, None)
        self.marlin = marlin_layout.to_marlin(packed)

    def _dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        packed = PackedInt4(self.qweight, self.scales, self.offsets, self.group_size, None)
        w = dequantize_packed(packed, dtype)
        if self.perm is not None:  # back to the checkpoint's column order
            w = w[:, torch.argsort(self.perm)]
        return w.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        rows = x.numel() // x.shape[-1]
        if self.marlin is not None and rows < len(self.marlin_configs):
            config = self.marlin_configs[rows]
            y = w4a16_marlin.marlin_linear(x, self.marlin, config, self.marlin_partials)
            return y if self.bias is None else y.add_(self.bias)
        if self.tinygemm is not None and rows <= w4a16_tinygemm.MAX_ROWS:
            t = self.tinygemm
            return w4a16_tinygemm.tinygemm_linear(
                x, t.qweight, t.scales_and_zeros, t.group_size, self.bias
            )
        if self.dequant_linear is not None and rows >= self.dequant_min_rows:
            return self.dequant_linear(
                x, self.qweight, self.scales, self.offsets, self.group_size,
                self.dequant_buffer.tensor, self.bias,
            )  # fmt: skip
        if self.gemlite is not None:
            g = self.gemlite
            return self.kernel(x, g.qweight, g.scales, g.zeros, g.group_size, g.fma, self.bias)
        if self.kernel is not None:
            return self.kernel(
                x, self.qweight, self.scales, self.offsets, self.group_size, self.bias
            )
        packed = PackedInt4(self.qweight, self.scales, self.offsets, self.group_size, None)
        return F.linear(x, dequantize_packed(packed, x.dtype), self.bias)

    def describe(self) -> str:
        if self.weight is not None:
            return f"dense fallback: {self.fallback}"
        g = "per-channel" if self.group_size == self.spec.in_features else f"g{self.group_size}"
        if self.gemlite is not None:
            how = "gemlite kernels"
        else:
            how = "Triton W4A16 kernels" if self.kernel is not None else "de-quantize + matmul"
        if self.marlin is not None:
            how = (
                f"Marlin kernel up to {len(self.marlin_configs) - 1} rows (4-bit weights held "
                f"twice), {how} above"
            )
        if self.tinygemm is not None:
            how = (
                f"tinygemm up to {w4a16_tinygemm.MAX_ROWS} rows (4-bit weights held twice), "
                f"{how} above"
            )
        if self.dequant_linear is not None:
            how += f", de-quantize + cuBLAS from {self.dequant_min_rows} rows"
        if self.gemlite_skipped is not None:
            how += f" (not gemlite: {self.gemlite_skipped})"
        if self.tinygemm_skipped is not None:
            how += f" (not tinygemm: {self.tinygemm_skipped})"
        if self.marlin_skipped is not None:
            how += f" (not marlin: {self.marlin_skipped})"
        return f"w4a16 {g}, {how}"


class Int4Method(LinearMethod):
    """Builds `Int4Linear` layers for a quantized checkpoint, dense ones for what it keeps
    unquantized."""

    def __init__(
        self,
        quant: QuantizationConfig,
        kernel: Kernel = "auto",
        dequant_min_rows: int | None = None,
    ) -> None:
        self.quant = quant
        self.kernel = kernel
        self.format = FORMATS[quant.method]
        self.dense = DenseMethod()
        self.dequant_min_rows = dequant_min_rows
        self.dequant = DequantBuffer()  # one per model, shared by its layers

    def create(self, spec: LinearSpec) -> LinearLayer:
        if spec.tp_size != 1 or spec.parallel != "none":
            raise QuantizationError(f"{spec.name}: tensor-parallel W4A16 layers (not built yet)")
        if spec.name == "lm_head" or _ignored(spec, self.quant.ignore):
            return self.dense.create(spec)
        return Int4Linear(
            spec, self.quant, self.format, self.kernel, self.dequant, self.dequant_min_rows
        )


def _ignored(spec: LinearSpec, ignore: tuple[str, ...]) -> bool:
    parent = spec.name.rpartition(".")[0]
    names = [f"{parent}.{s}" if parent else s for s in spec.shard_sizes]
    return any(n in ignore or n.rpartition(".")[2] in ignore for n in names)


def check_quantization(quant: QuantizationConfig) -> None:
    """Raise `QuantizationError` for what no layer of this plugin could serve."""
    if quant.method not in FORMATS:
        raise QuantizationError(
            f"quantization method {quant.method!r} is not supported by w4a16; "
            f"choose {', '.join(FORMATS)}"
        )
    if quant.bits != 4:
        raise QuantizationError(f"{quant.bits}-bit weights are not supported (only 4-bit)")
    if quant.group_size not in SUPPORTED_GROUPS:
        raise QuantizationError(
            f"group size {quant.group_size} is not supported; choose 32, 64, 128 or -1 "
            "(per channel)"
        )


class W4A16Linear(LinearKernel):
    """4-bit weights (GPTQ, AWQ, compressed-tensors, GGUF Q4_0/Q4_1), 16-bit activations."""

    formats = tuple(FORMATS)
    Options = W4A16Options

    def linear_kernel(
        self, model: ModelInfo, quantization: QuantizationConfig | None
    ) -> LinearMethod:
        if quantization is None:
            raise QuantizationError(
                "the w4a16 plugin needs a quantized checkpoint (config.json "
                "quantization_config, or --quantization gguf for a GGUF file)"
            )
        check_quantization(quantization)
        kernel = self.options.kernel
        if kernel == "gemlite" and model.device.type == "cuda":
            from pegboard.core.kernels import w4a16_gemlite

            reason = w4a16_gemlite.unavailable_reason(model.device, model.dtype)
            if reason is not None:
                raise QuantizationError(f"--w4a16-kernel gemlite: {reason}")
        if kernel == "tinygemm" and model.device.type == "cuda":
            reason = w4a16_tinygemm.unavailable_reason(model.device, model.dtype)
            if reason is not None:
                raise QuantizationError(f"--w4a16-kernel tinygemm: {reason}")
        if kernel == "marlin" and model.device.type == "cuda":
            reason = _marlin_unavailable_reason(model)
            if reason is not None:
                raise QuantizationError(f"--w4a16-kernel marlin: {reason}")
        return Int4Method(quantization, kernel, self.options.dequant_min_rows)


def _marlin_unavailable_reason(model: ModelInfo) -> str | None:
    """Why the Marlin kernel cannot run on this model's device at all: `unavailable_reason`,
    or NVRTC failing on one configuration (e.g. no CUDA headers: set CUDA_HOME)."""
    reason = w4a16_marlin.unavailable_reason(model.device, model.dtype)
    if reason is not None:
        return reason
    try:
        w4a16_marlin.compiled(w4a16_marlin.DEFAULT_LAYER_CONFIGS[1], 1, 128)
    except w4a16_marlin.CompileError as e:
        return str(e)
    return None
