"""Weights streamed into the L2 while small kernels run: one bulk-prefetch launch per site.

At batch 1 a decode layer's GEMVs stream its weights at ~4 TB/s, but between two GEMVs sit
kernels that read almost nothing: after the qkv projection, rope + KV store, decode attention
and its split reduce (~10 µs on the H200 in which the memory is idle), then the o projection
(33.5 MB at Llama-3.1-8B, ~9 µs from HBM). `prefetch(weight, nbytes)` launches one tiny kernel
whose threads each issue a `cp.async.bulk.prefetch.L2` (Hopper's TMA: one instruction asks the
L2 for `CHUNK` bytes, fire and forget, no register or shared memory holds the data). Launched
right after the qkv GEMV, the o projection's weights arrive in the 50 MB L2 while attention
runs, and its GEMV reads them from there. Nothing computes differently: outputs are bit for bit
the same with or without it.

The kernel launches with PDL (`pdl.py`): its programs issue their prefetches while the kernel
before still runs, let the next kernel launch, and then wait for the kernel before to complete,
so the chain's ordering is unchanged (the next kernel's wait on this one implies the one before).
Without PDL it runs in stream order, after the kernel before, and the L2 still fills while the
kernels after it run.

Sites are chosen per layer by `PEGBOARD_L2_PREFETCH` (`sites()`; off by default until
measured on a GPU). The sm_90 PTX has no CPU interpreter: `prefetch` is a no-op there.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.cuda_support import interpreting, pdl_enabled
from pegboard.core.kernels.gemv import MAX_ROWS
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

CHUNK = 16384  # bytes per bulk prefetch (a multiple of 16), fewer for a smaller tensor
PER_PROGRAM = 32  # prefetches per program: one per thread of its one warp
#: The decode-step sites `PEGBOARD_L2_PREFETCH` may name (`sites()`).
SITES = ("o", "gate_up", "down")


@triton.jit
def _prefetch_kernel(
    Base, nbytes, chunk, PER_PROGRAM: tl.constexpr, EVICT_LAST: tl.constexpr, PDL: tl.constexpr
):
    index = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
    # The last chunk ends at `nbytes` (overlapping the one before): nothing past the tensor.
    offs = tl.minimum(index.to(tl.int64) * chunk, nbytes - chunk)
    sizes = tl.full([PER_PROGRAM], chunk, tl.int32)
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            "{ .reg .b64 policy; createpolicy.fractional.L2::evict_last.b64 policy, 1.0; "
            "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, policy; }",
            "=r,l,r",
            [Base + offs, sizes],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    else:
        tl.inline_asm_elementwise(
            "cp.async.bulk.prefetch.L2.global [$1], $2;",
            "=r,l,r",
            [Base + offs, sizes],
            dtype=tl.int32,
            is_pure=False,
            pack=1,
        )
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # complete only after the kernel before: the chain's order stays as it was


@triton.jit
def _line_prefetch_kernel(
    Base, nbytes, PER_PROGRAM: tl.constexpr, EVICT_LAST: tl.constexpr, PDL: tl.constexpr
):
    index = tl.program_id(0) * PER_PROGRAM + tl.arange(0, PER_PROGRAM)
    ptrs = Base + tl.minimum(index.to(tl.int64) * 128, nbytes - 128)  # one 128-byte line each
    if EVICT_LAST:
        tl.inline_asm_elementwise(
            "prefetch.global.L2::evict_last [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )  # fmt: skip
    else:
        tl.inline_asm_elementwise(
            "prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1
        )
    if PDL:
        gdc_launch_dependents()
        gdc_wait()


def prefetch(
    weight: torch.Tensor,
    nbytes: float = math.inf,
    evict_last: bool = False,
    lines: bool = False,
    chunk: int = CHUNK,
    per_program: int = PER_PROGRAM,
    pdl: bool | None = None,
) -> None:
    """Ask the L2 for the first `nbytes` of `weight` (all of it by default), asynchronously, on
    the current stream. Needs a contiguous CUDA tensor on a Hopper or newer GPU; elsewhere (CPU,
    the interpreter, older GPUs) it does nothing. Graph-safe. `lines`: one `prefetch.global.L2`
    per 128-byte line instead of bulk prefetches of `chunk` bytes; `per_program`: prefetches
    per program (a power of two; one warp per 32); `pdl`: None for the device's default."""
    if not usable(weight):
        return
    size = int(min(weight.numel() * weight.element_size(), nbytes)) // 16 * 16
    if size < (128 if lines else 16):
        return
    pdl = pdl_enabled(weight.device) if pdl is None else pdl
    options = {"PER_PROGRAM": per_program, "EVICT_LAST": evict_last, "PDL": pdl}
    options |= {"num_warps": max(1, min(8, per_program // 32))}
    options |= {"launch_pdl": True} if pdl else {}
    base = weight.view(-1).view(torch.uint8)
    if lines:
        grid = (triton.cdiv(size, 128 * per_program),)
        _line_prefetch_kernel[grid](base, size, **options)
        return
    chunk = min(chunk, size)
    _prefetch_kernel[(triton.cdiv(size, chunk * per_program),)](base, size, chunk, **options)


def usable(weight: torch.Tensor) -> bool:
    """Whether `prefetch` issues anything for `weight`: a contiguous CUDA tensor on an NVIDIA
    GPU of compute capability 9.0+ (TMA), 16-byte aligned, outside the Triton interpreter."""
    if weight.device.type != "cuda" or interpreting() or torch.version.hip is not None:
        return False
    if not weight.is_contiguous() or weight.data_ptr() % 16:
        return False
    return torch.cuda.get_device_capability(weight.device)[0] >= 9


class Ahead:
    """One site's prefetch: the first `nbytes` of `layer.weight` (read at each call, so a reloaded
    weight is followed), asked for when a step has at most `gemv.MAX_ROWS` rows (the decode
    batches whose linears stream their weights)."""

    def __init__(
        self, layer: torch.nn.Module, nbytes: float, evict_last: bool, lines: bool = False
    ) -> None:
        self.layer = layer
        self.nbytes = nbytes
        self.evict_last = evict_last
        self.lines = lines

    def __call__(self, rows: int) -> None:
        if rows <= MAX_ROWS:
            prefetch(
                self.layer.weight,
                self.nbytes,
                self.evict_last,
                self.lines,
                per_program=256 if self.lines else PER_PROGRAM,
            )


def ahead(site: str, layer: torch.nn.Module) -> Ahead | None:
    """The prefetch of `layer`'s weight at `site` when `PEGBOARD_L2_PREFETCH` names it and the
    layer keeps a plain `weight` tensor (dense layers; a quantized layer's packed tensors are
    not prefetched); else None."""
    nbytes = sites().get(site)
    if nbytes is None or not isinstance(getattr(layer, "weight", None), torch.Tensor):
        return None
    lines = os.environ.get("PEGBOARD_L2_PREFETCH_LINES", "0") not in ("", "0")
    return Ahead(layer, nbytes, evict_last(), lines)


def sites() -> dict[str, float]:
    """`PEGBOARD_L2_PREFETCH` (read when the fused kernels are switched on): comma-separated
    sites, each `name` (the whole weight) or `name=MB` (its first MB), of `SITES` — `o`: the
    o projection, asked for after the qkv GEMV (rope, attention and the reduce run meanwhile);
    `gate_up`: after the o GEMV (the add + norm runs); `down`: after the gate/up GEMV. Empty or
    "0" (the default): none. Returns bytes per site; raises ValueError naming a bad entry."""
    value = os.environ.get("PEGBOARD_L2_PREFETCH", "")
    out: dict[str, float] = {}
    if value in ("", "0"):
        return out
    for entry in value.split(","):
        name, _, mb = entry.strip().partition("=")
        if name not in SITES:
            raise ValueError(f"PEGBOARD_L2_PREFETCH: unknown site {name!r} (sites: {SITES})")
        try:
            out[name] = float(mb) * 2**20 if mb else math.inf
        except ValueError:
            raise ValueError(f"PEGBOARD_L2_PREFETCH: {entry!r} is not name=megabytes") from None
    return out


def evict_last() -> bool:
    """`PEGBOARD_L2_PREFETCH_EVICT_LAST`: prefetched lines marked evict-last in the L2 (so the
    GEMV's evict-first loads of the layer before do not push them out)."""
    return os.environ.get("PEGBOARD_L2_PREFETCH_EVICT_LAST", "0") not in ("", "0")
