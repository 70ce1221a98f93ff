"""The GEMV's L2 prefetch before the PDL wait (`GemvConfig.prefetch`, `PEGBOARD_GEMV_PREFETCH`).

A program asks the L2 for the rest of its weight slice before it waits for the kernel before,
so that at batch 1 the memory streams the next GEMV's weights while a norm or rope runs. It
changes no arithmetic: on the GPU the outputs are bit for bit those without it. On a CPU the
interpreter cannot run its inline PTX (it is left out there), so the CPU tests check the line
arithmetic and, compiled for sm_90 in a subprocess, that the prefetches are really issued, all
before the wait, at no cost in spills. Off by default until measured (docs/kernels.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels import gemv as gemv_module  # noqa: E402
from pegboard.core.kernels.gemv import GemvConfig, gemv, prefetch_options  # noqa: E402

BF16 = torch.empty(0, dtype=torch.bfloat16)
FP32 = torch.empty(0, dtype=torch.float32)


def test_prefetch_covers_the_tiles_after_the_first_in_128_byte_lines():
    # K = 4096 in 1024-wide tiles: one more tile is 1024 bf16 = 16 lines; three (the rest) 48 -> 64
    assert prefetch_options(GemvConfig(4, 1024, prefetch=1), 4096, 1024, BF16) == {
        "PF_LINE": 64,
        "PF_LINES": 16,
    }
    assert prefetch_options(GemvConfig(4, 1024, prefetch=3), 4096, 1024, BF16)["PF_LINES"] == 64
    # more tiles than the slice holds: only the slice (two tiles after the first, 2048 columns)
    assert prefetch_options(GemvConfig(4, 1024, prefetch=9), 3072, 1024, BF16)["PF_LINES"] == 32
    # float32 weights: 32 columns a line
    assert prefetch_options(GemvConfig(4, 1024, prefetch=1), 4096, 1024, FP32) == {
        "PF_LINE": 32,
        "PF_LINES": 32,
    }


def test_no_prefetch_when_off_or_when_the_slice_is_one_tile():
    assert prefetch_options(GemvConfig(4, 1024, prefetch=0), 4096, 1024, BF16) == {}
    assert prefetch_options(GemvConfig(2, 2048, prefetch=4), 2048, 2048, BF16) == {}


def test_prefetch_only_into_weights_under_the_size_limit(monkeypatch):
    """`PEGBOARD_GEMV_PREFETCH_MAX_MB`: Llama-3.1-8B's o projection (4096 x 4096 bf16, 32 MiB)
    prefetches under a 40 MiB limit, its qkv (6144 x 4096, 48 MiB) does not; no limit: both."""
    o, qkv = (torch.empty(n, 4096, dtype=torch.bfloat16, device="meta") for n in (4096, 6144))
    config = GemvConfig(4, 1024, prefetch=64)
    assert gemv_module.PREFETCH_MAX_BYTES == 0
    assert prefetch_options(config, 4096, 1024, qkv)["PF_LINES"] == 64
    monkeypatch.setattr(gemv_module, "PREFETCH_MAX_BYTES", 40 << 20)
    assert prefetch_options(config, 4096, 1024, o)["PF_LINES"] == 64
    assert prefetch_options(config, 4096, 1024, qkv) == {}


def test_prefetch_is_off_by_default(monkeypatch):
    """Until a GPU run shows it pays: no configuration in `DECODE_CONFIGS` asks for it and the
    module default (`PEGBOARD_GEMV_PREFETCH` unset) is 0."""
    assert "PEGBOARD_GEMV_PREFETCH" not in os.environ
    assert gemv_module.PREFETCH_TILES == 0
    configs = [c for by_rows in gemv_module.DECODE_CONFIGS.values() for c in by_rows.values()]
    assert all(c is None or c.prefetch is None for c in configs)
    assert prefetch_options(GemvConfig(4, 1024), 4096, 1024, BF16) == {}
    monkeypatch.setattr(gemv_module, "PREFETCH_TILES", 2)  # what the variable sets
    assert prefetch_options(GemvConfig(4, 1024), 4096, 1024, BF16)["PF_LINES"] == 32


@pytest.mark.slow
def test_prefetches_compile_for_sm90_before_the_pdl_wait_without_spills():
    pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run(
        [sys.executable, "-m", "pegboard.core.kernels.gemv_compile", "--json"],
        capture_output=True, text=True, env=env, timeout=300, check=True,
    )  # fmt: skip
    compiled = json.loads(out.stdout.strip().splitlines()[-1])
    plain, pf3, dot = (
        compiled[k] for k in ("qkv (4, 1024)", "qkv (4, 1024) pf3", "dot (64, 128) pf4")
    )
    assert plain["ptx_prefetches"] == plain["sass_prefetches"] == 0
    # 4 rows x 64 lines over 128 threads: 2 per thread; the tensor-core kernel's 64 x 8 over 128: 4
    assert pf3["ptx_prefetches"] == pf3["prefetches_before_wait"] == pf3["sass_prefetches"] == 2
    assert dot["ptx_prefetches"] == dot["prefetches_before_wait"] == dot["sass_prefetches"] == 4
    assert all(c["spilled_bytes"] == 0 for c in compiled.values())
    assert pf3["registers"] <= plain["registers"] + 8


def _cases():
    # Llama-3.1-8B's batch-1 entries, and the tensor-core kernel at 4 rows (prefetch: 1 tile, all)
    return [
        (1, 6144, 4096, GemvConfig(4, 1024)),
        (1, 4096, 14336, GemvConfig(2, 2048)),
        (1, 4096, 4096, GemvConfig(4, 1024, split_k=2)),
        (4, 6144, 4096, GemvConfig(64, 128, dot=True, num_stages=4)),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "n", "k", "config"), _cases())
def test_gpu_prefetch_gives_the_same_bits(rows, n, k, config):
    gen = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(rows, k, generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randn(n, k, generator=gen, device="cuda").to(torch.bfloat16)
    expected = gemv(x, w, None, GemvConfig(**{**config.__dict__, "prefetch": 0}))
    for tiles in (1, 64):
        out = gemv(x, w, None, GemvConfig(**{**config.__dict__, "prefetch": tiles}))
        torch.testing.assert_close(out, expected, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_prefetching_gemv_is_captured_and_replays():
    config = GemvConfig(4, 1024, prefetch=3)
    gen = torch.Generator("cuda").manual_seed(1)
    x = torch.randn(1, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    w = torch.randn(6144, 4096, generator=gen, device="cuda").to(torch.bfloat16)
    gemv(x, w, None, config)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemv(x, w, None, config)
    x.copy_(torch.randn(1, 4096, generator=gen, device="cuda").to(torch.bfloat16))
    graph.replay()
    torch.testing.assert_close(out, gemv(x, w, None, GemvConfig(4, 1024)), atol=0, rtol=0)
