"""The Marlin-style W4A16 CUDA kernel (`core/kernels/w4a16_marlin.py`) and its layout
(`plugins/linear/marlin_layout.py`).

On CPU: the layout holds exactly the serving layout's weights; the kernel's index math, run by a
pure-torch model of the kernel (`fixtures/marlin_emulation.py`: the same loads per lane, the
PTX ISA's fragment placement, the same flushes, warp and split reductions), multiplies like the
de-quantized weights for group 32/64/128 and per-channel, several shapes (Llama-3.1-8B's on a
few blocks) and M = 1, 3, 16, 64; a layout with two nibbles swapped fails that check; every
candidate configuration compiles with nvcc for sm_90a without spills at the groups it takes
(skipped without nvcc); word rings (`stages`) follow the kernel's cp.async schedule
(`WordRing`); the ctypes structures of the PDL launch match cuda.h (compiled with `cc`). Marked
`gpu` (skipped without CUDA): the NVRTC-compiled kernel against the de-quantized reference
(every group x Llama shape, every candidate), inside a CUDA graph, with K split across blocks;
rings and PDL give the same bits as the configuration without, a chain of PDL launches reads
each output after it is written, eager and replayed in a CUDA graph.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from fixtures.int4_layers import packed_layer, rel_error
from fixtures.marlin_emulation import WordRing, emulate
from pegboard.core.kernels import cuda_launch, w4a16_marlin
from pegboard.core.kernels.w4a16_marlin import MarlinConfig, config_unsupported_reason
from pegboard.plugins.linear import marlin_layout
from pegboard.plugins.linear.int4 import PackedInt4, dequantize_packed
from pegboard.plugins.linear.marlin_layout import dequantize_marlin, to_marlin

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
BF16 = torch.bfloat16
LLAMA_8B = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)]
#: Configurations the emulation runs (uneven warp splits, two row tiles, short steps, bf16
#: parameters, K split across three blocks, word rings of 2-8 stages around 1-16 steps a warp,
#: x a step ahead).
CONFIGS = [
    MarlinConfig(),
    MarlinConfig(warps=4, chunks=2),
    MarlinConfig(warps=3, chunks=2, row_tiles=2),
    MarlinConfig(warps=1, chunks=1),
    MarlinConfig(warps=8, chunks=4, params="bf16"),
    MarlinConfig(warps=4, chunks=2, params="f16"),
    MarlinConfig(warps=2, chunks=1, splits=3),
    MarlinConfig(warps=3, chunks=1, stages=3),
    MarlinConfig(warps=1, chunks=1, stages=8, pdl=True),
    MarlinConfig(warps=2, chunks=2, row_tiles=2, stages=4),
    MarlinConfig(warps=8, chunks=2, stages=2),
    MarlinConfig(warps=2, chunks=1, stages=4, splits=3),
    MarlinConfig(warps=3, chunks=2, stages=3, x_ahead=True),
    MarlinConfig(warps=2, chunks=1, row_tiles=2, x_ahead=True),
]


#: Norm-relative error bounds vs the exact product: float32 parameters leave the bf16 output's
#: rounding only; float16 zeros round to 11 bits, bf16 scales and zeros to 8 (tinygemm's).
ERROR_BOUND = {"f32": 4e-3, "f16": 4e-3, "bf16": 1e-2}


def _reference(x: torch.Tensor, p: PackedInt4) -> torch.Tensor:
    return x.double() @ dequantize_packed(p, torch.float32).double().t()


def _group(k: int, group: int) -> int:
    return k if group == -1 else group


# -------------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("offsets", ["asym", "sym", "float"])
@pytest.mark.parametrize("group", [32, 64, 128, -1])
def test_layout_holds_exactly_the_serving_weights(offsets, group):
    p = packed_layer(48, 256, _group(256, group), BF16, offsets)
    w = dequantize_marlin(to_marlin(p))
    # float32 (scale, zero = offset + 8 scale): exact for integer zero points, to rounding else
    tol = 0 if offsets != "float" else 1e-6
    torch.testing.assert_close(w, dequantize_packed(p, torch.float32), atol=tol, rtol=0)


def test_a_lanes_word_is_its_a_fragment_in_register_order():
    # nibble j -> register j % 4 (shift 4 (j % 4)), half j // 4: the magic and-or's pairs
    rows, cols = marlin_layout.nibble_positions()
    assert (rows[0].tolist(), cols[0].tolist()) == (
        [0, 8, 0, 8, 0, 8, 0, 8],
        [0, 0, 8, 8, 1, 1, 9, 9],
    )
    assert (rows[31].tolist(), cols[31].tolist()) == (
        [7, 15, 7, 15, 7, 15, 7, 15],
        [6, 6, 14, 14, 7, 7, 15, 15],
    )


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("rows", [1, 16, 64])  # (3 rows: the small-shape test has 5)
def test_emulated_kernel_multiplies_like_the_dequantized_weights(config, group, rows):
    n, k = 64, 1024
    p = packed_layer(n, k, _group(k, group), BF16, "asym")
    layout = to_marlin(p, w4a16_marlin.PARAM_DTYPES[config.params])
    reason = config_unsupported_reason(config, rows, n, k, layout.group_size)
    if reason:
        pytest.skip(reason)
    x = torch.randn(rows, k).to(BF16)
    err = rel_error(emulate(x, layout, config), _reference(x, p))
    # float32 parameters: the bf16 output's rounding only; bf16 ones: tinygemm's precision
    assert err < ERROR_BOUND[config.params]


@pytest.mark.parametrize("shape", [(16, 64), (48, 576), (96, 1536)], ids=str)
def test_emulated_kernel_takes_small_and_uneven_shapes(shape):
    n, k = shape
    p = packed_layer(n, k, 64, BF16, "float")
    x = torch.randn(5, k).to(BF16)
    config = MarlinConfig(warps=4, chunks=1)
    assert rel_error(emulate(x, to_marlin(p), config), _reference(x, p)) < 4e-3


@functools.cache
def _llama_layer_cpu(n: int, k: int):
    """A packed Llama-sized layer, its Marlin layout and the exact weights of its first and
    last 16 rows (packing on the CPU takes seconds: once per shape)."""
    p = packed_layer(n, k, 128, BF16, "asym")
    rows = torch.cat([torch.arange(16), torch.arange(n - 16, n)])
    return to_marlin(p), rows, dequantize_packed(p, torch.float32)[rows].double()


@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("shape", LLAMA_8B, ids=lambda s: f"{s[0]}x{s[1]}")
def test_emulated_kernel_on_llama_shapes_first_and_last_blocks(shape, rows):
    n, k = shape
    layout, out_rows, w = _llama_layer_cpu(n, k)
    x = torch.randn(rows, k).to(BF16)
    config = w4a16_marlin.default_config(rows, n, k, 128)
    y = emulate(x, layout, config, [0, n // 16 - 1])
    assert rel_error(y[:, out_rows], x.double() @ w.t()) < 4e-3


def test_a_layout_with_two_nibbles_swapped_gives_wrong_products(monkeypatch):
    p = packed_layer(32, 256, 128, BF16, "asym")
    x = torch.randn(3, 256).to(BF16)
    swapped = list(marlin_layout.NIBBLE_ELEMENT)
    swapped[1], swapped[4] = swapped[4], swapped[1]  # rows g + 8 and g of column 2t swapped
    monkeypatch.setattr(marlin_layout, "NIBBLE_ELEMENT", tuple(swapped))
    assert rel_error(emulate(x, to_marlin(p), MarlinConfig()), _reference(x, p)) > 0.3


@pytest.mark.parametrize("stages", range(2, 9))
@pytest.mark.parametrize("steps", [0, 1, 2, 5, 17])
def test_a_word_ring_gives_each_step_its_own_words_once_landed(stages, steps):
    ring = WordRing(stages, 3, 3 + steps)  # raises on a read in flight or an unread overwrite
    assert [ring.step_words(s) for s in range(3, 3 + steps)] == list(range(3, 3 + steps))


def test_a_word_ring_refuses_a_read_before_its_copy_is_waited_for():
    ring = WordRing(4, 0, 8)
    ring.stages = 5  # the kernel would wait for one group too few
    with pytest.raises(AssertionError, match="in flight|before any copy"):
        [ring.step_words(s) for s in range(8)]


def test_configurations_name_their_new_knobs_and_the_old_names_stay():
    assert MarlinConfig(8, 2).name == "w8-c2-r1-f32p"
    named = MarlinConfig(4, 2, 2, stages=4, x_ahead=True, pdl=True, splits=2).name
    assert named == "w4-c2-r2-f32p-st4-xa-pdl-s2"
    assert "ring" in config_unsupported_reason(MarlinConfig(stages=4, l2_ahead=1), 1, 64, 1024, 128)
    assert "stages" in config_unsupported_reason(MarlinConfig(stages=1), 1, 64, 1024, 128)
    assert "shared memory" in config_unsupported_reason(
        MarlinConfig(8, 4, stages=3), 1, 64, 1024, 128
    )


def test_k_is_split_across_blocks_only_where_the_row_blocks_do_not_cover_the_gpu():
    # (blocks, steps, warps, multiprocessors): Llama's o at 256 blocks, SmolLM2's 576 rows at 36
    assert w4a16_marlin.auto_splits(256, 16, 8, 132) == 1
    assert w4a16_marlin.auto_splits(36, 9, 2, 132) == 4  # 2 x 132 / 36 -> 8, 9 steps / 2 warps
    assert w4a16_marlin.auto_splits(4, 64, 8, 132) == 8  # every warp keeps a step
    assert w4a16_marlin.auto_splits(4, 4, 8, 132) == 1


def test_configurations_say_what_they_cannot_run():
    reason = config_unsupported_reason
    assert reason(MarlinConfig(), 16, 4096, 4096, 128) is None
    assert "step" in reason(MarlinConfig(chunks=4), 1, 64, 576, 64)  # 576 = 2.25 steps of 256
    assert reason(MarlinConfig(chunks=1), 1, 64, 576, 64) is None
    assert "divide" in reason(MarlinConfig(chunks=4), 1, 64, 1536, 384)
    assert "rows" in reason(MarlinConfig(row_tiles=2), 1, 48, 256, 128)
    assert "64 rows" in reason(MarlinConfig(), 65, 64, 256, 128)
    assert "two groups of 32" in reason(MarlinConfig(chunks=2), 1, 64, 256, 32)
    assert w4a16_marlin.default_config(1, 64, 256, 32) == MarlinConfig(8, 1)
    assert "shared memory" in reason(MarlinConfig(warps=8, row_tiles=4), 64, 4096, 4096, 128)
    assert [w4a16_marlin.token_tiles(m) for m in (1, 8, 9, 16, 17, 33, 64)] == [1, 1, 2, 2, 4, 8, 8]


def test_layout_refuses_shapes_it_cannot_hold():
    with pytest.raises(ValueError, match="K=96"):
        to_marlin(packed_layer(16, 96, 32, BF16, "asym"))
    assert "N=40" in marlin_layout.shape_unsupported_reason(40, 256, 128)


CUDA_H = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include" / "cuda.h"
LAUNCH_LAYOUT_C = r"""
#include <cuda.h>
#include <stddef.h>
#include <stdio.h>
#define F(s, m) printf("%s.%s %zu %zu\n", #s, #m, offsetof(s, m), sizeof(((s*)0)->m))
int main(void) {
  printf("CUlaunchConfig %zu\nCUlaunchAttribute %zu\nCUlaunchAttributeValue %zu\n",
         sizeof(CUlaunchConfig), sizeof(CUlaunchAttribute), sizeof(CUlaunchAttributeValue));
  F(CUlaunchConfig, gridDimX); F(CUlaunchConfig, gridDimY); F(CUlaunchConfig, gridDimZ);
  F(CUlaunchConfig, blockDimX); F(CUlaunchConfig, blockDimY); F(CUlaunchConfig, blockDimZ);
  F(CUlaunchConfig, sharedMemBytes); F(CUlaunchConfig, hStream); F(CUlaunchConfig, attrs);
  F(CUlaunchConfig, numAttrs); F(CUlaunchAttribute, id); F(CUlaunchAttribute, value);
  F(CUlaunchAttributeValue, programmaticStreamSerializationAllowed);
  printf("PROGRAMMATIC_STREAM_SERIALIZATION %d\n",
         (int)CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION);
  return 0;
}
"""


@pytest.mark.skipif(shutil.which("cc") is None or not CUDA_H.exists(), reason="needs cc, cuda.h")
def test_launch_structures_match_cuda_h(tmp_path):
    (tmp_path / "layout.c").write_text(LAUNCH_LAYOUT_C)
    cmd = ["cc", f"-I{CUDA_H.parent}", "-o", str(tmp_path / "layout"), str(tmp_path / "layout.c")]
    subprocess.run(cmd, check=True, capture_output=True, timeout=60)
    printed = subprocess.run([tmp_path / "layout"], check=True, capture_output=True, text=True)
    header = dict(line.split(" ", 1) for line in printed.stdout.splitlines())
    ours = {
        "CUlaunchConfig": cuda_launch.LaunchConfig,
        "CUlaunchAttribute": cuda_launch.LaunchAttribute,
        "CUlaunchAttributeValue": cuda_launch.LaunchAttributeValue,
    }
    names = {"programmaticStreamSerializationAllowed": "flag"}  # our name for the union's int
    for key, value in header.items():
        if key == "PROGRAMMATIC_STREAM_SERIALIZATION":
            assert int(value) == cuda_launch.PROGRAMMATIC_STREAM_SERIALIZATION
        elif "." in key:
            struct, member = key.split(".")
            field = getattr(ours[struct], names.get(member, member))
            assert [field.offset, field.size] == [int(v) for v in value.split()], key
        else:
            assert ctypes.sizeof(ours[key]) == int(value), key
    assert len(header) == 17


class _Driver:
    """Stands in for libcuda: records what `cuLaunchKernelEx` was given, reading the argument
    pointers during the call (the launch keeps them alive only until it returns)."""

    def cuLaunchKernelEx(self, config, func, params, extra):  # noqa: N802 (the driver's name)
        c = config._obj
        self.dims = (c.gridDimX, c.gridDimY, c.gridDimZ, c.blockDimX, c.blockDimY, c.blockDimZ)
        self.launch = (
            c.sharedMemBytes,
            c.hStream,
            c.numAttrs,
            c.attrs[0].id,
            c.attrs[0].value.flag,
        )
        self.func = func.value
        as_ = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
        self.args = [
            ctypes.cast(params[i], ctypes.POINTER(t)).contents.value for i, t in enumerate(as_)
        ]
        return 0


def test_pdl_launch_passes_grid_stream_attribute_and_arguments(monkeypatch):
    driver = _Driver()
    monkeypatch.setattr(cuda_launch, "_driver", lambda: driver)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"cuda_stream": 77}))
    kernel = type("K", (), {"func": ctypes.c_void_p(0x1234)})
    qweight, x = torch.zeros(4, dtype=torch.int32), torch.zeros(8, dtype=BF16)
    cuda_launch.launch_pdl(kernel, (256, 2, 1), (128, 1, 1), [qweight, x, 16, -3])
    assert driver.dims == (256, 2, 1, 128, 1, 1)
    assert driver.launch == (0, 77, 1, cuda_launch.PROGRAMMATIC_STREAM_SERIALIZATION, 1)
    assert driver.func == 0x1234
    assert driver.args == [qweight.data_ptr(), x.data_ptr(), 16, -3]


def _ptxas(config: MarlinConfig, mt: int, group: int, tmp_path) -> str:
    src = tmp_path / f"{w4a16_marlin.kernel_name(config, mt, group)}.cu"
    src.write_text(w4a16_marlin.kernel_source(config, mt, group))
    cmd = ["nvcc", "-arch=sm_90a", "-cubin", "-Xptxas", "-v", "-o", str(src.with_suffix(".cubin"))]
    done = subprocess.run([*cmd, str(src)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stderr


CANDIDATES = [(mt, c) for mt, configs in w4a16_marlin.CANDIDATES.items() for c in configs]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize("group", [32, 128])  # (per-channel compiles as 128 does: one group a step)
@pytest.mark.parametrize(("mt", "config"), CANDIDATES, ids=lambda v: getattr(v, "name", str(v)))
def test_candidate_configurations_compile_for_sm90a_without_spills(mt, config, group, tmp_path):
    reason = config_unsupported_reason(config, 8 * mt, 4096, 4096, group)
    if reason:
        pytest.skip(reason)
    log = _ptxas(config, mt, group, tmp_path)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    regs = int(re.search(r"Used (\d+) registers", log).group(1))
    assert spills and spills.groups() == ("0", "0"), log
    assert regs <= 255
    # the shared memory `config_unsupported_reason` counts (and `last_block`), within 48 KiB
    smem = int(re.search(r"(\d+) bytes smem", log).group(1))
    counted = w4a16_marlin._reduce_bytes(config, mt) + w4a16_marlin._ring_bytes(config) + 4
    assert smem <= min(counted, 48 * 1024), log


# -------------------------------------------------------------------------------- GPU


@functools.lru_cache(maxsize=8)
def _llama_layer(n: int, k: int, group: int):
    p = packed_layer(n, k, group, BF16, "asym", device="cuda")
    return p, to_marlin(p)


@gpu
@needs_cuda
@pytest.mark.parametrize("group", [32, 64, 128, -1])
@pytest.mark.parametrize("shape", LLAMA_8B, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("rows", [1, 4, 16, 64])
def test_kernel_matches_the_dequantized_reference_on_llama_shapes(group, shape, rows):
    n, k = shape
    p, layout = _llama_layer(n, k, _group(k, group))
    x = torch.randn(rows, k, device="cuda").to(BF16)
    assert rel_error(w4a16_marlin.marlin_linear(x, layout), _reference(x, p)) < 4e-3


@gpu
@needs_cuda
@pytest.mark.parametrize(("mt", "config"), CANDIDATES, ids=lambda v: getattr(v, "name", str(v)))
def test_every_candidate_configuration_matches_the_reference(mt, config):
    rows = 8 * mt - 1
    p, layout = _llama_layer(4096, 4096, 128)
    if config.params != "f32":
        layout = to_marlin(p, w4a16_marlin.PARAM_DTYPES[config.params])
    x = torch.randn(rows, 4096, device="cuda").to(BF16)
    got = w4a16_marlin.marlin_linear(x, layout, config)
    assert rel_error(got, _reference(x, p)) < ERROR_BOUND[config.params]


@gpu
@needs_cuda
def test_kernel_with_leading_dimensions_replays_in_a_cuda_graph():
    p, layout = _llama_layer(4096, 4096, 128)
    x = torch.randn(2, 2, 4096, device="cuda").to(BF16)
    w4a16_marlin.marlin_linear(x, layout)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_marlin.marlin_linear(x, layout)
    for _ in range(2):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert out.shape == (2, 2, 4096)
        assert rel_error(out.reshape(4, 4096), _reference(x.reshape(4, 4096), p)) < 4e-3


@gpu
@needs_cuda
@pytest.mark.parametrize("rows", [1, 16])
def test_k_split_across_blocks_adds_up_and_rearms_in_a_cuda_graph(rows):
    p = packed_layer(576, 1536, 64, BF16, "float", device="cuda")  # 36 row blocks: K is split
    layout = to_marlin(p)
    config = MarlinConfig(warps=4, chunks=1)
    x = torch.randn(rows, 1536, device="cuda").to(BF16)
    assert rel_error(w4a16_marlin.marlin_linear(x, layout, config), _reference(x, p)) < 4e-3
    assert layout.counters.eq(0).all()  # the last block of each row tile re-armed its counter
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_marlin.marlin_linear(x, layout, config)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_error(out, _reference(x, p)) < 4e-3


#: Each new knob beside the configuration it changes: same words, same arithmetic in the same
#: order, so the same bits out.
TWINS = [
    (MarlinConfig(8, 2), MarlinConfig(8, 2, stages=4)),
    (MarlinConfig(4, 2), MarlinConfig(4, 2, stages=8)),
    (MarlinConfig(8, 4), MarlinConfig(8, 4, pdl=True)),
    (MarlinConfig(4, 2), MarlinConfig(4, 2, stages=4, pdl=True)),
    (MarlinConfig(4, 2, 2), MarlinConfig(4, 2, 2, stages=4, pdl=True)),
    (MarlinConfig(8, 2), MarlinConfig(8, 2, stages=4, x_ahead=True)),
    (MarlinConfig(4, 2, 2), MarlinConfig(4, 2, 2, stages=4, x_ahead=True, pdl=True)),
    (MarlinConfig(8, 1), MarlinConfig(8, 1, x_ahead=True)),
]


@gpu
@needs_cuda
@pytest.mark.parametrize(("base", "twin"), TWINS, ids=lambda c: c.name)
@pytest.mark.parametrize("rows", [1, 5, 16])
def test_rings_x_ahead_and_pdl_give_the_bits_of_the_configuration_without(base, twin, rows):
    p, layout = _llama_layer(4096, 14336, 128)  # down: 28-56 steps a warp, rings wrap
    x = torch.randn(rows, 14336, device="cuda").to(BF16)
    want = w4a16_marlin.marlin_linear(x, layout, base)
    assert torch.equal(w4a16_marlin.marlin_linear(x, layout, twin), want)
    assert rel_error(want, _reference(x, p)) < 4e-3
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = w4a16_marlin.marlin_linear(x, layout, twin)
    x.copy_(torch.randn_like(x))
    graph.replay()
    assert torch.equal(out, w4a16_marlin.marlin_linear(x, layout, base))


def _chain(x: torch.Tensor, layout, config: MarlinConfig, links: int) -> torch.Tensor:
    """`links` layers in a row, each reading the one before's output: with PDL each kernel
    starts before the one before has finished and must wait for it before reading x."""
    for _ in range(links):
        x = w4a16_marlin.marlin_linear(x, layout, config)
    return x


@gpu
@needs_cuda
@pytest.mark.parametrize(
    "config",
    [
        MarlinConfig(8, 4, pdl=True),
        MarlinConfig(4, 2, stages=4, pdl=True),
        MarlinConfig(8, 2, stages=4, x_ahead=True, pdl=True),
    ],
    ids=lambda c: c.name,
)
@pytest.mark.parametrize("rows", [1, 16])
def test_pdl_chain_reads_each_output_after_it_is_written_eager_and_in_a_cuda_graph(config, rows):
    p, layout = _llama_layer(4096, 4096, 128)
    plain = replace(config, pdl=False)
    x = torch.randn(rows, 4096, device="cuda").to(BF16)
    assert torch.equal(_chain(x, layout, config, 6), _chain(x, layout, plain, 6))
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _chain(x, layout, config, 6)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert torch.equal(out, _chain(x, layout, plain, 6))


@gpu
@needs_cuda
def test_pdl_and_ring_with_k_split_across_blocks_rearm_in_a_cuda_graph():
    p = packed_layer(576, 1536, 64, BF16, "float", device="cuda")  # 36 row blocks: K is split
    layout = to_marlin(p)
    config = MarlinConfig(warps=4, chunks=1, stages=3, pdl=True)
    x = torch.randn(16, 1536, device="cuda").to(BF16)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # two launches back to back share the counters
        first = w4a16_marlin.marlin_linear(x, layout, config)
        second = w4a16_marlin.marlin_linear(x, layout, config)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_error(first, _reference(x, p)) < 4e-3
        assert torch.equal(first, second)
    assert layout.counters.eq(0).all()
