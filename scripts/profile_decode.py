"""Profile batch-1 decode on the GPU: ms per token, then cProfile of one generate call.

python3 scripts/profile_decode.py --config llama-3.1-8b --tokens 64 [--attention triton]
    [--disable-cuda-graph] [--disable-fused-kernels] [--disable-gemv] [--cuda-graph-max-bs N]
    [--no-profile]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch
from pegboard.core.bench.models import config_model_dir
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="llama-3.1-8b")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--attention", default=None, help="attention backend (default: the engine's)")
    p.add_argument("--disable-cuda-graph", action="store_true", help="decode eagerly")
    p.add_argument(
        "--disable-fused-kernels", action="store_true", help="plain PyTorch norms, rope, SiLU"
    )
    p.add_argument(
        "--disable-gemv",
        action="store_true",
        help="linear layers on cuBLAS with the other fused kernels on (PEGBOARD_DISABLE_GEMV=1)",
    )
    p.add_argument("--cuda-graph-max-bs", type=int, help="largest captured batch size")
    p.add_argument("--no-profile", action="store_true", help="skip the cProfile pass")
    args = p.parse_args()
    if args.disable_gemv:
        os.environ["PEGBOARD_DISABLE_GEMV"] = "1"
    llm = LLM(
        str(config_model_dir(args.config)),
        load_format="dummy",
        max_model_len=4096,
        attention=args.attention,
        disable_cuda_graph=args.disable_cuda_graph,
        disable_fused_kernels=args.disable_fused_kernels,
        **({"cuda_graph_max_bs": args.cuda_graph_max_bs} if args.cuda_graph_max_bs else {}),
    )
    runner = llm.engine.runner
    print(f"fused kernels {'on' if runner.model.fused_kernels else 'off'}", end=", ")
    print(f"GEMV {'on' if runner.model.gemv_kernels else 'off'}")
    if runner.cuda_graphs is not None:
        print(f"CUDA graphs on, batch sizes {runner.cuda_graphs.sizes}")
    else:
        print(f"CUDA graphs off: {runner.cuda_graph_off_reason}")
    params = SamplingParams(max_tokens=args.tokens, temperature=args.temperature, ignore_eos=True)
    prompt = list(range(100, 228))
    llm.generate([prompt], params)
    torch.cuda.synchronize()
    start = time.perf_counter()
    llm.generate([prompt], params)
    torch.cuda.synchronize()
    per_token = (time.perf_counter() - start) / args.tokens
    print(f"{per_token * 1e3:.2f} ms/token ({1 / per_token:.1f} tok/s)")
    if args.no_profile:
        return
    profiler = cProfile.Profile()
    profiler.enable()
    llm.generate([prompt], params)
    torch.cuda.synchronize()
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
