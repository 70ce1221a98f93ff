"""Compile pegboard's W4A16 kernels for a CUDA architecture on a machine without a GPU and
print what the GPU would run: registers, spills, shared memory, and the instruction mix of each
loop of the SASS (`cuobjdump`, shipped with Triton), with the instructions per weight per
thread of the K loop. Evidence for kernel design where no GPU is at hand; not a timing.

    python3 scripts/triton_sass.py [--config BLOCK_M,BLOCK_N,BLOCK_K,SPLIT_K,WARPS,STAGES]
        [--n 6144] [--k 4096] [--group 128] [--dtype bfloat16] [--arch 90] [--sass FILE]

`--config` takes the fields of `w4a16.W4A16Config` in order (block_m <= 4: the CUDA-core
kernel; the seventh to ninth places: pdl, fix-up, inline-asm unpacking as 0/1).
Arguments get Triton's usual specialisation (pointers and N, strides divisible by 16).
"""

from __future__ import annotations

import argparse
import collections
import re
from pathlib import Path

import torch
import triton
from pegboard.core.kernels import w4a16, w4a16_kernels
from pegboard.plugins.kernels.triton_attention.decode_compile import cuobjdump
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TRITON_TYPES = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32"}


def compile_kernel(cfg: w4a16.W4A16Config, n: int, k: int, group: int, dtype, arch: int):
    fn = w4a16_kernels._dot_kernel if cfg.dot else w4a16_kernels._gemv_kernel
    x = TRITON_TYPES[dtype]
    runtime = {"x_ptr": x, "qw_ptr": "*i32", "s_ptr": "*fp16", "o_ptr": "*fp16", "b_ptr": x,
               "y_ptr": x, "p_ptr": "*fp32", "c_ptr": "*i32", "M": "i32", "N": "i32",
               "stride_xm": "i32", "stride_ym": "i32"}  # fmt: skip
    const = {"K": k, "GROUP": group, "HAS_BIAS": False, "SPLIT_K": cfg.split_k,
             "FIXUP": cfg.fixup and cfg.split_k > 1,
             "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "PDL": True}  # fmt: skip
    if cfg.dot:
        post = dtype in w4a16.MAGIC_16BIT and group % cfg.block_k == 0
        magic, value = w4a16.MAGIC_16BIT[dtype if post else torch.bfloat16]
        const |= {"POST_SCALE": post, "MAGIC16": magic, "MAGIC_VALUE": value,
                  "PRECISION": "ieee" if dtype == torch.float32 else "tf32", "ASM": cfg.asm}  # fmt: skip
    names = fn.arg_names
    signature = {a: runtime.get(a, "constexpr") for a in names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, a in enumerate(names)
               if runtime.get(a, "").startswith("*") or a in ("N", "stride_xm", "stride_ym")}  # fmt: skip
    src = ASTSource(fn, signature, {(names.index(a),): v for a, v in const.items()}, aligned)
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)


def loops(sass: str) -> list[tuple[int, collections.Counter]]:
    """Per backward branch (a loop): its instruction count and opcode mix."""
    code = [
        (int(a, 16), op.strip()) for a, op in re.findall(r"/\*([0-9a-f]{4})\*/\s+([^;]*);", sass)
    ]
    found = []
    for addr, op in code:
        target = re.search(r"BRA\s+(?:`\(\.L_x_\d+\)\s*)?0x([0-9a-f]+)", op)
        if target and int(target.group(1), 16) < addr:
            body = [o for a, o in code if int(target.group(1), 16) <= a <= addr]
            names = (re.sub(r"^@!?U?P\w+\s+", "", o).split()[0].split(".")[0] for o in body)
            found.append((len(body), collections.Counter(names)))
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="16,128,128,8,4,3")
    p.add_argument("--n", type=int, default=6144)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--group", type=int, default=128)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--arch", type=int, default=90)
    p.add_argument("--sass", type=Path, help="write the whole SASS here")
    args = p.parse_args()
    fields = [int(v) for v in args.config.split(",")]
    cfg = w4a16.W4A16Config(*fields[:6], *(bool(v) for v in fields[6:]))
    kernel = compile_kernel(cfg, args.n, args.k, args.group, getattr(torch, args.dtype), args.arch)
    sass = cuobjdump(kernel.asm["cubin"], "-sass")
    if args.sass:
        args.sass.write_text(sass)
    usage = " ".join(
        re.findall(r"(REG:\d+|STACK:\d+|SHARED:\d+)", cuobjdump(kernel.asm["cubin"], "-res-usage"))
    )
    print(f"{cfg} sm_{args.arch}: {usage}, Triton shared memory {kernel.metadata.shared} B")
    weights = cfg.block_k * cfg.block_n / (32 * cfg.num_warps)  # per thread per K step
    for count, mix in loops(sass):
        top = ", ".join(f"{op} {c}" for op, c in mix.most_common(14))
        print(f"loop: {count} instructions ({count / weights:.2f} per weight per thread): {top}")


if __name__ == "__main__":
    main()
