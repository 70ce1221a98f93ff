"""W4A16 matmul through gemlite (github.com/dropbox/gemlite, Apache-2.0): Triton A16W4 kernels,
the library issue 15 names beside writing our own (`w4a16.py`). Optional: `pip install
'pegboard[gemlite]'`; nothing imports it on CPU (its import queries the CUDA device).

Weights come in gemlite's layout (`pegboard.plugins.linear.gemlite_layout`). Which kernel runs
is chosen here by rows of x, not by gemlite's own rule (`GEMV_REVSPLITK` up to 4 rows, which
reads the weights once per row): one row `GEMV_REVSPLITK` (CUDA cores; each program two K
steps, their sums added into the output with atomics), up to 64 rows `GEMM_SPLITK` (tensor
cores, x padded to 16+ rows, K split up to 16 ways, atomics too), more `GEMM`.

Launch configurations. gemlite picks them with Triton's autotuner keyed on the shape and the
rows bucket (`get_closest_m`: 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, ... 4096), answering from its
config cache where the signature is there and else timing ~20 candidates, each compiled:
minutes per model, and never allowed inside a CUDA-graph capture. So `prepare` fills the cache
before the first call: gemlite's shipped table for the device (it matches names: `h100.json`
on an H100; an H200, the same sm_90 chip with faster memory, gets `h100.json` too), then
`PEGBOARD_GEMLITE_CONFIGS` (a file `gemlite.cache_config` wrote), then, for signatures still
missing, `fallback_config` — one configuration each, so no candidates are timed. (Triton 3.6
still times a lone configuration once per key, ~0.1 s, at the warm-up run before capture.)

Capture safety: outputs are allocated (and zeroed for the atomic kernels) inside gemlite's
forward, no host synchronisation; the autotuner's first call per key must happen outside a
capture, which the engine's uncaptured warm-up run per graph size does.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from importlib import metadata
from pathlib import Path

import torch
from packaging.specifiers import SpecifierSet

log = logging.getLogger("pegboard.kernels")

#: The gemlite releases whose internals this module relies on (`forward_functional`'s argument
#: order, the config cache's signature format).
SUPPORTED = SpecifierSet(">=0.6,<0.7")
W_NBITS, ELEMENTS_PER_WORD = 4, 8
GEMV_MAX_ROWS, SPLIT_K_MAX_ROWS = 1, 64
#: The kernels that add partial sums into their output with atomics, given a float32 output
#: (see `gemlite_linear`); `PEGBOARD_GEMLITE_NATIVE_ATOMICS=1` lets them add in x's dtype as
#: gemlite does by default (one conversion kernel fewer per call, K / 16 roundings more).
ATOMIC_KINDS = (
    () if os.environ.get("PEGBOARD_GEMLITE_NATIVE_ATOMICS") == "1"
    else ("GEMV_REVSPLITK", "GEMM_SPLITK")
)  # fmt: skip
#: Devices that get another device's shipped table: same architecture and SM count.
SHIPPED_TABLE_FOR = {"h200": "h100"}


def matmul_type(rows: int) -> str:
    """The gemlite kernel for `rows` rows of x (see the module docstring)."""
    if rows <= GEMV_MAX_ROWS:
        return "GEMV_REVSPLITK"
    return "GEMM_SPLITK" if rows <= SPLIT_K_MAX_ROWS else "GEMM"


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> str | None:
    """Why gemlite cannot run this model's layers here (None if it can): a CUDA device, 16-bit
    activations (its float32 path multiplies in TF32), gemlite installed in a supported version
    and importing."""
    if device.type != "cuda":
        return "gemlite runs on CUDA devices only"
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "gemlite does not run in Triton's interpreter"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"gemlite multiplies 16-bit activations, not {dtype}"
    if importlib.util.find_spec("gemlite") is None:
        return "gemlite is not installed (pip install 'pegboard[gemlite]')"
    version = metadata.version("gemlite")
    if version not in SUPPORTED:
        return f"gemlite {version} is installed; pegboard supports {SUPPORTED}"
    try:
        _gemlite()
    except Exception as e:  # an import that fails on this machine
        return f"gemlite failed to import: {type(e).__name__}: {e}"
    return None


def shape_unsupported_reason(n: int, k: int, group: int) -> str | None:
    """Why gemlite cannot take a `[N, K]` layer with this group size (None if it can)."""
    if k % 32:
        return f"K={k} is not a multiple of 32"
    if group < 32 or k % group:
        return f"group size {group} (gemlite's tensor-core kernels step 32 columns in a group)"
    return None


@functools.cache
def _gemlite():
    """Import gemlite once and load its launch configurations (see the module docstring)."""
    import gemlite
    from gemlite import core

    name = torch.cuda.get_device_name().lower().replace(" ", "_")
    for ours, theirs in SHIPPED_TABLE_FOR.items():
        table = Path(core.__file__).parent / "configs" / f"{theirs}.json"
        if ours in name and table.exists():
            gemlite.load_config(str(table))
            log.info("gemlite: launch configurations of %s (%s)", theirs, name)
    extra = os.environ.get("PEGBOARD_GEMLITE_CONFIGS")
    if extra:
        if not gemlite.load_config(extra, print_error=False):
            raise RuntimeError(f"PEGBOARD_GEMLITE_CONFIGS={extra}: cannot read it")
        log.info("gemlite: launch configurations from %s", extra)
    return gemlite


def type_id(dtype: torch.dtype) -> int:
    """gemlite's autotune type key: input dtype (bf16 keyed as fp16) x 100 + weight bits."""
    return (1 if dtype in (torch.float16, torch.bfloat16) else 0) * 100 + W_NBITS


def signature(rows: int, n: int, k: int, group: int, dtype: torch.dtype) -> str:
    """The config cache's key for `rows` rows of x (already a bucket) and this layer."""
    return str((rows, n, k, group, ELEMENTS_PER_WORD, type_id(dtype)))


def fallback_config(kind: str, rows: int, n: int, k: int, group: int) -> dict:
    """One launch configuration for a signature no table has, within the constraints gemlite's
    own candidate pruning applies (K steps inside a group, 32+ for the tensor cores; the GEMV's
    two K slices inside one group); shaped like the H100 table's entries for Llama shapes."""
    block_n = min(128, _next_pow2(n))
    if kind == "GEMV_REVSPLITK":
        return {"BLOCK_SIZE_M": 1, "BLOCK_SIZE_N": min(512, _next_pow2(n)),
                "BLOCK_SIZE_K": 8, "A_load_order": 0, "dot_prod_mode": 0,
                "num_warps": 4, "num_stages": 2}  # fmt: skip
    block_k = max(32, min(64, group))
    if kind == "GEMM_SPLITK":
        block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
        programs = -(-rows // block_m) * -(-n // block_n)
        split = 1
        while split < 16 and programs * split * 2 <= 264 and k % (block_k * split * 2) == 0:
            split *= 2  # about two programs per SM of an H100/H200
        return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": block_k,
                "GROUP_SIZE_M": 8, "SPLIT_K": split, "A_load_order": 0,
                "num_warps": 4, "num_stages": 2}  # fmt: skip
    block_m = 64 if rows <= 64 else 128
    return {"BLOCK_SIZE_M": block_m, "BLOCK_SIZE_N": block_n, "BLOCK_SIZE_K": block_k,
            "GROUP_SIZE_M": 8, "A_load_order": 0,
            "num_warps": 8 if block_m == 128 else 4, "num_stages": 2}  # fmt: skip


def _next_pow2(v: int) -> int:
    return 1 << max(0, (v - 1).bit_length())


def prepare(n: int, k: int, group: int, dtype: torch.dtype) -> int:
    """Make sure gemlite's config cache answers every rows bucket of this layer (see the module
    docstring); returns how many signatures got a `fallback_config`."""
    from gemlite.triton_kernels.utils import M_MAPPING

    cache = _gemlite().core.GEMLITE_TRITON_CONFIG_CACHE  # the shipped tables loaded first
    filled = 0
    for rows in sorted(set(M_MAPPING[1:])):  # every rows bucket (1, 2, 4, ..., 24, 32, 48, ...)
        kind = matmul_type(rows)
        key = signature(rows, n, k, group, dtype)
        if key not in cache.setdefault(kind, {}):
            cache[kind][key] = fallback_config(kind, rows, n, k, group)
            filled += 1
    return filled


def gemlite_linear(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    fma: bool,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`x @ W.T + bias` for weights in gemlite's layout (`gemlite_layout.GemliteLayout`): x
    `[..., K]` bf16/fp16, a new `[..., N]` tensor. Never synchronises with the host.

    The kernels that sum K slices with atomics (`ATOMIC_KINDS`) write float32, rounded to x's
    dtype once here: added in bf16 (gemlite's default on sm_90), the GEMV's K / 16 partial sums
    are as many roundings (1.8e-2 relative at K = 4096 by the rounding model; 2.4e-3 measured in
    float16, whose rounding is 8x finer)."""
    gemlite = _gemlite()
    n = qweight.shape[1]
    rows = x.numel() // x.shape[-1]
    if rows == 0:
        return x.new_empty(*x.shape[:-1], n)
    kind = matmul_type(rows)
    out_dtype = torch.float32 if kind in ATOMIC_KINDS else x.dtype
    out = gemlite.forward_functional(
        x,
        bias,
        [qweight, scales, zeros, _no_meta_scale(x.device)],
        _meta_args(x.dtype, out_dtype, scales.dtype, group_size, fma),
        gemlite.core.GEMLITE_MATMUL_TYPES_MAPPING[kind],
    )
    return out if out_dtype == x.dtype else out.to(x.dtype)


#: Rows `self_check` multiplies: one of each kernel `matmul_type` picks.
CHECK_ROWS = (1, 16, 128)


def self_check(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor,
    group_size: int,
    fma: bool,
    weight: torch.Tensor,
) -> str | None:
    """Multiply random x by the layer through each kernel (`CHECK_ROWS`) and compare with
    `x @ weight.T` (`weight`: the layer de-quantized, `[N, K]` in x's dtype): None if every
    result is within 1e-2, else what went wrong. Run at load once per shape and form, so that a
    gemlite that does not behave as this module expects falls back instead of serving wrong
    numbers; it also compiles those kernels before the first request."""
    gen = torch.Generator(weight.device).manual_seed(0)
    for rows in CHECK_ROWS:
        x = torch.randn(rows, weight.shape[1], generator=gen, device=weight.device)
        x = x.to(weight.dtype)
        try:
            out = gemlite_linear(x, qweight, scales, zeros, group_size, fma)
        except Exception as e:  # a kernel that does not compile or launch here
            return f"{matmul_type(rows)} failed: {type(e).__name__}: {str(e)[:200]}"
        ref = x.float() @ weight.float().t()
        err = ((out.float() - ref).norm() / ref.norm()).item()
        if not err < 1e-2:
            return f"{matmul_type(rows)} is {err:.1e} (relative) from the reference"
    return None


@functools.cache
def _no_meta_scale(device: torch.device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.float32, device=device)  # NVFP4's; unused for INT4


@functools.cache
def _meta_args(
    dtype: torch.dtype, out: torch.dtype, meta: torch.dtype, group_size: int, fma: bool
) -> list[int]:
    """`GemLiteLinearTriton.get_meta_args` for an A16W4 layer: scaled activations off, 4 bits,
    group, unpack mask, 8 values per int32, input/output/accumulator/meta dtypes, no channel
    scale, `W_group_mode` 4 (fma) or 3 (shift), contiguous weights."""
    from gemlite.dtypes import TORCH_TO_DTYPE, DType

    return [0, W_NBITS, group_size, 2**W_NBITS - 1, ELEMENTS_PER_WORD,
            TORCH_TO_DTYPE[dtype].value, TORCH_TO_DTYPE[out].value, DType.FP32.value,
            TORCH_TO_DTYPE[meta].value, 0, 4 if fma else 3, 1]  # fmt: skip
