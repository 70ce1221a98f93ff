"""The Triton kernels of a verify step's graph, compiled for sm_90 on a machine without a GPU, as
the runtime specialises them for Qwen3-0.6B (bf16, 16 query and 8 KV heads of 128, pages of
16): the extend attention kernel (5 new tokens per request), `store_kv` and the fused rope.
Prints each kernel's SASS instructions, registers, memory instructions and a hash of its SASS,
so two trees compare by running this script under each (`PYTHONPATH=DIR`, DIR/pegboard a
checkout, as `profile_host_cpu.py` does). Arguments get Triton's own specialisation (ints equal
to 1 become constants, those divisible by 16 get the hint); `--runtime NAME` keeps one
argument a runtime value, as if it were not specialised (e.g. `stride_vd`).

    PYTHONPATH=DIR python3 scripts/verify_kernels_sass.py [--runtime stride_vd] [--arch 90]
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import importlib
import json
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton._C.libtriton import native_specialize_impl
from triton.backends.compiler import BaseBackend, GPUTarget
from triton.compiler import ASTSource

H, KVH, D, PAGE = 16, 8, 128, 16  # Qwen3-0.6B's heads, KV heads, head size; the paged cache's
QKV = (H + 2 * KVH) * D  # q, k and v are views of the fused qkv projection's rows
EXTEND = (
    "pegboard.plugins.kernels.triton_attention.extend",
    "_extend_kernel",
    dict(Q="*bf16", K_cache="*bf16", V_cache="*bf16", Out="*bf16", Page_table="*i32",
         Prefix_lens="*i32", Query_starts="*i32", Block_map="*i32", Tree_meta="*i32",
         Tree_bits="*i32", qk_scale=0.1275, stride_qt=QKV, stride_qh=D, stride_ot=H * D,
         stride_oh=D, stride_kp=PAGE * KVH * D, stride_ks=KVH * D, stride_kh=D,
         stride_vp=PAGE * KVH * D, stride_vs=KVH * D, stride_vh=D, stride_vd=1, stride_pt=256),
    dict(GROUP=2, TOKENS_PER_BLOCK=32, HEAD_DIM=D, PAGE_SIZE=PAGE, BLOCK_M=64, BLOCK_N=32,
         BLOCK_D=D, PRECISION="tf32", TREE=False, F16_DOT=False),
    4, 3,
)  # fmt: skip
STORE_KV = (
    "pegboard.plugins.kernels.triton_attention.store_kv",
    "_store_kv_kernel",
    dict(K="*bf16", V="*bf16", K_cache="*bf16", V_cache="*bf16", Slots="*i64", stride_kt=QKV,
         stride_kh=D, stride_vt=QKV, stride_vh=D, stride_kcp=PAGE * KVH * D, stride_kcs=KVH * D,
         stride_kch=D, stride_vcp=PAGE * KVH * D, stride_vcs=KVH * D, stride_vch=D, stride_vcd=1,
         k_inv_scale=1.0, v_inv_scale=1.0),
    dict(NUM_KV_HEADS=KVH, HEAD_DIM=D, PAGE_SIZE=PAGE, BLOCK_H=KVH, BLOCK_D=D, FP8_MAX=0.0),
    4, 3,
)  # fmt: skip
ROTARY = (
    "pegboard.core.kernels.rotary",
    "_rotary_kernel",
    dict(Q="*bf16", K="*bf16", Positions="*i64", Cos="*fp32", Sin="*fp32", QNormWeight="*bf16",
         KNormWeight="*bf16", stride_qt=QKV, stride_qh=D, stride_kt=QKV, stride_kh=D,
         stride_table=D, eps=1e-6),
    dict(NUM_Q_HEADS=H, NUM_KV_HEADS=KVH, HALF=D // 2, BLOCK_HQ=H, BLOCK_HK=KVH,
         BLOCK_D=D // 2, QK_NORM=True, PDL=True),
    4, 3,
)  # fmt: skip


def cuobjdump(cubin: bytes, flag: str) -> str:
    """`cuobjdump FLAG` (shipped with Triton; here, not the tree's: an older tree lacks it)."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([str(tool), flag, f.name], capture_output=True, text=True).stdout


def signature(fn, values: dict, constants: dict, runtime: set[str]):
    """Triton's launch-time specialisation of `values` (pointer types as strings, floats,
    ints) for `fn`'s arguments that the kernel has; `constants` are its constexprs."""
    sig, const, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            sig[name], const[(i,)] = "constexpr", constants[name]
            continue
        value = values[name]
        if isinstance(value, str):  # a pointer: torch's allocations are 16-byte aligned
            sig[name], attrs[(i,)] = value, [["tt.divisibility", 16]]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            kind, key = native_specialize_impl(BaseBackend, value, False, name not in runtime, True)
            sig[name] = kind
            if kind == "constexpr":
                const[(i,)] = value
            elif key == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def compile_summary(spec, runtime: set[str], arch: int) -> dict:
    module, name, values, constants, warps, stages = spec
    fn = getattr(importlib.import_module(module), name)
    if not hasattr(fn, "arg_names"):
        raise RuntimeError("TRITON_INTERPRET=1 gave interpreted kernels: run without it")
    sig, const, attrs = signature(fn, values, constants, runtime)
    kernel = triton.compile(
        ASTSource(fn, sig, const, attrs),
        target=GPUTarget("cuda", arch, 32),
        options={"num_warps": warps, "num_stages": stages},
    )
    sass = cuobjdump(kernel.asm["cubin"], "-sass")
    code = re.findall(r"/\*[0-9a-f]{4}\*/\s+([^;]*);", sass)
    ops = collections.Counter(op.split()[0] for op in code)
    registers = re.search(r"REG:(\d+)", cuobjdump(kernel.asm["cubin"], "-res-usage"))
    return {
        "instructions": len(code),
        "registers": int(registers.group(1)) if registers else None,
        "shared_bytes": kernel.metadata.shared,
        "memory_ops": {o: n for o, n in sorted(ops.items()) if o.startswith(("LDG", "STG", "LDS"))},
        "sass_md5": hashlib.md5("\n".join(code).encode()).hexdigest()[:12],
        "runtime_ints": [a for a, t in sig.items() if t in ("i32", "i64")],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runtime", action="append", default=[], help="an int left unspecialised")
    p.add_argument("--arch", type=int, default=90)
    args = p.parse_args()
    kernels = {"extend": EXTEND, "store_kv": STORE_KV, "rotary": ROTARY}
    out = {k: compile_summary(spec, set(args.runtime), args.arch) for k, spec in kernels.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
