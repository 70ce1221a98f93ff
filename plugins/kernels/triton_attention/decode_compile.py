"""Compile the decode kernel for a GPU without one: does a variant build for sm_90, how much
shared memory does it take, and how many key/value tiles does it keep in flight?

Triton compiles ahead for any target (`triton.compile` with a `GPUTarget`, `ptxas` ships with
it), so this runs on a CPU. It catches what the interpreter does not (code the compiler
refuses: a non-constexpr global, a tile over the shared-memory limit) and shows how Triton
pipelined the loop: the depth of the shared-memory buffers of the key/value tiles (1: each
tile is waited for after the last is computed; 2 or more: loads overlap compute).
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from pegboard.plugins.kernels.triton_attention.decode import _decode_kernel, decode_meta
from pegboard.plugins.kernels.triton_attention.decode_configs import (
    DecodeConfig,
    heads_per_program,
)
from pegboard.plugins.kernels.triton_attention.decode_fp8mma import (
    _decode_fp8mma_kernel,
    fp8mma_meta,
)

_POINTERS = {"Q": "*bf16", "Out": "*bf16", "Mid_out": "*fp32", "Mid_lse": "*fp32",
             "Page_table": "*i32", "Seq_lens": "*i32", "Counters": "*i32",
             "Order": "*i64"}  # fmt: skip
_KV = {torch.bfloat16: "*bf16", torch.float8_e4m3fn: "*fp8e4nv"}


def _jit(fn):
    """The compilable kernel; under `TRITON_INTERPRET=1` there is none (`@triton.jit` gave
    interpreted functions, callees included): run this in a process without it."""
    from triton.runtime.jit import JITFunction

    if not isinstance(fn, JITFunction):
        raise RuntimeError("compile_decode needs a process without TRITON_INTERPRET=1")
    return fn


@dataclass
class Compiled:
    shared_bytes: int
    kv_buffers: int  # shared-memory slots of the key tile: tiles in flight + 1 being computed
    registers: int = 0  # per thread (`cuobjdump -res-usage`)
    #: SASS opcodes of the tensor-core instructions with their type suffixes (e.g.
    #: `HGMMA.64x16x32.F32.E4M3.E4M3`: e4m3 wgmma, "QGMMA" in NVIDIA's tables), and counts
    mma: dict[str, int] = field(default_factory=dict)
    #: `ldmatrix` instructions (`LDSM`) in the SASS: an MMA operand read into registers
    ldmatrix: int = 0
    #: the main loop's SASS (the longest backward branch over tensor-core instructions):
    #: "instructions" per thread and iteration, and BAR / LDGSTS / LDSM / SHFL / STS / LDG
    loop: dict[str, int] = field(default_factory=dict)
    #: bytes of local memory per thread (`cuobjdump -res-usage` STACK): spilled registers
    stack: int = 0


def loop_counts(sass: str) -> dict[str, int]:
    """Instructions of the longest loop of `sass` that runs tensor-core instructions (per
    thread and iteration), and how many of them are barriers, async copies, ldmatrix,
    shuffles, shared stores and global loads (empty if no such loop)."""
    code = [
        (int(a, 16), t.strip()) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)
    ]
    best: list[str] = []
    for addr, text in code:
        target = re.search(r"\bBRA\s+0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) < addr:
            body = [t for a, t in code if int(target.group(1), 16) <= a <= addr]
            if len(body) > len(best) and any("MMA" in t for t in body):
                best = body
    if not best:
        return {}
    ops = [re.sub(r"^@!?U?P\w+\s+", "", t).split(".")[0].split()[0] for t in best]
    return {"instructions": len(ops)} | {op: ops.count(op) for op in _LOOP_OPS}


_LOOP_OPS = ("BAR", "LDGSTS", "LDSM", "SHFL", "STS", "LDG")


def cuobjdump(cubin: bytes, flag: str) -> str:
    """`cuobjdump FLAG` (shipped with Triton) of a compiled kernel: `-sass`, `-res-usage`."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def _summary(kernel) -> Compiled:
    ttgir = kernel.asm["ttgir"]
    depths = re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)
    resources = cuobjdump(kernel.asm["cubin"], "-res-usage")
    usage = re.search(r"REG:(\d+)", resources)
    stack = re.search(r"STACK:(\d+)", resources)
    sass = cuobjdump(kernel.asm["cubin"], "-sass")
    mma: dict[str, int] = {}
    for op in re.findall(r"\b([HQIU]?GMMA\.[\w.]+|HMMA\.[\w.]+|QMMA\.[\w.]+)", sass):
        mma[op] = mma.get(op, 0) + 1
    return Compiled(
        kernel.metadata.shared, max(map(int, depths), default=0),
        int(usage.group(1)) if usage else 0, mma, len(re.findall(r"\bLDSM\b", sass)),
        loop_counts(sass), int(stack.group(1)) if stack else 0,
    )  # fmt: skip


def compile_decode(
    config: DecodeConfig,
    kv_dtype: torch.dtype = torch.bfloat16,
    group: int = 2,
    num_kv_heads: int = 8,
    head_dim: int = 128,
    page_size: int = 16,
    split: bool = False,
    capability: int = 90,
) -> Compiled:
    """Compile the kernel `decode_attention` launches for `config` (bf16 queries, strides
    divisible by 16 as the pool's are): `_decode_kernel`, or over an FP8 cache for an
    `fp8_mma` variant `_decode_fp8mma_kernel` over values transposed per page (`hdp`); raises
    what the compiler raises."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = _decode_kernel
    if config.fp8_mma and kv_dtype.itemsize == 1:
        fn = _decode_fp8mma_kernel
        bn = config.block_n if head_dim <= 128 else min(config.block_n, 64)
        constexprs = fp8mma_meta(bn, group, head_dim, page_size, split, config.min_chunk,
                                 True, config.v_tile, config.row_sum_once, config.lean_addr,
                                 heads_per_program(config, num_kv_heads, head_dim),
                                 config.streams)  # fmt: skip
        constexprs |= {"HEAD_FASTEST": config.head_fastest, "PREFETCH": config.prefetch_pages}
    else:
        constexprs = decode_meta(config, torch.bfloat16, kv_dtype, group, num_kv_heads,
                                 head_dim, page_size, split, fma=False)  # fmt: skip
        constexprs |= {"PDL": config.pdl}
    signature, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _POINTERS or name in ("K_cache", "V_cache"):
            signature[name] = _POINTERS.get(name) or _KV[kv_dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "qk_scale":
            signature[name] = "fp32"
        elif fn is _decode_fp8mma_kernel and name in ("stride_vs", "stride_vd"):
            signature[name] = "i32"  # hdp: tokens contiguous (1), head dims page_size apart
        else:  # strides (the page table's row length need not be a multiple of 16), splits
            signature[name] = "i32"
            if name.startswith("stride") and name != "stride_pt":
                attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(
        ASTSource(_jit(fn), signature, constexprs, attrs),
        target=GPUTarget("cuda", capability, 32),
        options={"num_warps": config.num_warps, "num_stages": config.num_stages},
    )
    return _summary(kernel)


def main(argv: list[str] | None = None) -> None:
    """`python -m pegboard.plugins.kernels.triton_attention.decode_compile [names] [--json]`:
    each variant (default: all) compiled for sm_90 with bf16 and FP8 caches (GQA group 2,
    unsplit, and group 4 split): shared memory, key/value buffers, registers, tensor-core
    instructions, the main loop's instruction counts (SASS) and spills (`stack`), or the
    error."""
    import argparse
    import json

    from pegboard.plugins.kernels.triton_attention.decode_configs import DECODE_VARIANTS

    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("names", nargs="*", default=list(DECODE_VARIANTS))
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    rows = {}
    for name in args.names:
        for kv, dtype in (("bf16", torch.bfloat16), ("fp8", torch.float8_e4m3fn)):
            for group, split in ((2, False), (4, True)):
                key = f"{name} {kv} group {group}{' split' if split else ''}"
                try:
                    c = compile_decode(DECODE_VARIANTS[name], dtype, group=group, split=split)
                    rows[key] = {"shared_bytes": c.shared_bytes, "kv_buffers": c.kv_buffers,
                                 "registers": c.registers, "mma": c.mma,
                                 "ldmatrix": c.ldmatrix, "loop": c.loop,
                                 "stack": c.stack}  # fmt: skip
                except Exception as err:  # noqa: BLE001 - reported per variant
                    rows[key] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
                if not args.json:
                    print(f"{key:40s} {rows[key]}", flush=True)
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
