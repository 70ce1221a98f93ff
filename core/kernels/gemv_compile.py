"""Compile the GEMV kernels for sm_90 without a GPU and report what the L2 prefetch adds.

Triton compiles ahead for any target (`triton.compile` with a `GPUTarget`; `ptxas` and
`cuobjdump` ship with it), so this runs on a CPU. It shows what a timing cannot without a GPU:
that a configuration with `prefetch` builds, where its `prefetch.global.L2` instructions sit
relative to the PDL wait (`griddepcontrol.wait`: they must come before it), how many the SASS
holds (`CCTL`), and the registers and spills each variant costs.

    python -m pegboard.core.kernels.gemv_compile [--json]   # in a process without TRITON_INTERPRET
"""

from __future__ import annotations

import argparse
import json
import re
from dataclasses import asdict, dataclass

import torch
import triton
from pegboard.core.kernels import gemv
from pegboard.core.kernels.gemv import GemvConfig
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

_POINTERS = {"X": "*bf16", "W": "*bf16", "Bias": "*bf16", "Out": "*bf16", "Partial": "*fp32"}
_INTS = ("M", "N", "K", "k_per_split", "stride_xm", "stride_om")


@dataclass
class CompiledGemv:
    name: str
    registers: int
    spilled_bytes: int
    #: `prefetch.global.L2` in the PTX, and how many of them come before the PDL wait
    ptx_prefetches: int
    prefetches_before_wait: int
    #: SASS prefetch instructions (`CCTL` with a prefetch operation)
    sass_prefetches: int


def compile_gemv(
    name: str, config: GemvConfig, n: int, k: int, rows: int = 1, arch: int = 90
) -> CompiledGemv:
    """`config` compiled for `rows` rows of x times an `[n, k]` bf16 weight, PDL on, with the
    launch arguments `gemv.gemv` would pass (the L2 prefetch as `prefetch_options` sets it)."""
    from triton.runtime.jit import JITFunction

    fn = gemv._dot_kernel if config.dot else gemv._gemv_kernel
    if not isinstance(fn, JITFunction):
        raise RuntimeError("compile_gemv needs a process without TRITON_INTERPRET=1")
    block_k = min(config.block_k, triton.next_power_of_2(k))
    k_per_split = triton.cdiv(triton.cdiv(k, config.split_k), block_k) * block_k
    const = {
        "BLOCK_M": max(16, triton.next_power_of_2(rows)) if config.dot else rows,
        "BLOCK_N": config.block_n,
        "BLOCK_K": block_k,
        "EVEN_K": k % k_per_split == 0,
        "HAS_BIAS": False,
        "SPLIT": triton.cdiv(k, k_per_split) > 1,
        "PDL": True,
        "GATE_UP": False,
        **gemv.prefetch_options(config, k_per_split, block_k, torch.empty(0, dtype=torch.bfloat16)),
    }
    const = {"SILU_OUT": False, "PF_LINE": 64, "PF_LINES": 0} | const  # the defaults too
    if config.dot:
        const["PRECISION"] = "tf32"
    names = fn.arg_names
    signature = {a: _POINTERS.get(a) or ("i32" if a in _INTS else "constexpr") for a in names}
    aligned = {
        (i,): [["tt.divisibility", 16]]
        for i, a in enumerate(names)
        if a in _POINTERS or a in ("N", "K", "k_per_split", "stride_xm", "stride_om")
    }
    constants = {(names.index(a),): v for a, v in const.items() if a in names}
    src = ASTSource(fn, signature, constants, aligned)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    return _summary(name, kernel)


def _summary(name: str, kernel) -> CompiledGemv:
    from pegboard.plugins.kernels.triton_attention.decode_compile import cuobjdump

    ptx = kernel.asm["ptx"]
    wait = ptx.find("griddepcontrol.wait")
    usage = cuobjdump(kernel.asm["cubin"], "-res-usage")
    sass = cuobjdump(kernel.asm["cubin"], "-sass")
    return CompiledGemv(
        name=name,
        registers=int(re.search(r"REG:(\d+)", usage).group(1)),
        spilled_bytes=sum(int(b) for b in re.findall(r"STACK:(\d+)", usage)),
        ptx_prefetches=ptx.count("prefetch.global.L2"),
        prefetches_before_wait=ptx[: wait if wait >= 0 else len(ptx)].count("prefetch.global.L2"),
        sass_prefetches=len(re.findall(r"\bCCTL\S*\.PF", sass)),
    )


#: Llama-3.1-8B's qkv at batch 1 (`DECODE_CONFIGS`) without and with the prefetch of the rest of
#: its slice (3 tiles at K = 4096), and the tensor-core kernel's at 2 rows with 4 tiles.
VARIANTS = {
    "qkv (4, 1024)": (GemvConfig(4, 1024), 6144, 4096),
    "qkv (4, 1024) pf3": (GemvConfig(4, 1024, prefetch=3), 6144, 4096),
    "dot (64, 128) pf4": (GemvConfig(64, 128, dot=True, num_stages=4, prefetch=4), 6144, 4096),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print one JSON line")
    args = p.parse_args()
    results = {}
    for name, (config, n, k) in VARIANTS.items():
        results[name] = asdict(compile_gemv(name, config, n, k, rows=2 if config.dot else 1))
    if args.json:
        print(json.dumps(results))
        return
    for r in results.values():
        print(
            f"{r['name']:<22} regs {r['registers']:>3} spill {r['spilled_bytes']:>4} "
            f"PTX prefetches {r['ptx_prefetches']:>3} ({r['prefetches_before_wait']} before the "
            f"wait), SASS {r['sass_prefetches']}"
        )


if __name__ == "__main__":
    main()
