"""The e4m3 tensor-core decode kernel (`decode_fp8mma.py`, `fp8_mma` variants) against a float32
reference over the same e4m3 keys and values, with values stored NHD and transposed per page
(`KVPool.v_layout == "hdp"`).

Without a GPU the kernel runs in Triton's CPU interpreter (tiny shapes; its own rounding to
e4m3 is wrong, so the tests give it PyTorch's, `fixtures/interpreter_fp8.py`). The query and
the probabilities are quantized to e4m3, so the error against float32 attention is larger than
the 16-bit-dot variants'; against `reference_decode_fp8mma`, the same quantization tile by tile in PyTorch,
the kernel must agree to the output's bf16 rounding.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.decode_variants import ENGINE, interpreted  # noqa: E402
from fixtures.interpreter_fp8 import exact_e4m3_in_interpreter  # noqa: E402
from pegboard.plugins.kernels.triton_attention.decode import decode_attention  # noqa: E402
from pegboard.plugins.kernels.triton_attention.decode_configs import (  # noqa: E402
    DECODE_VARIANTS,
    decode_config,
)
from pegboard.plugins.kernels.triton_attention.decode_fp8mma import (  # noqa: E402
    reference_decode_fp8mma,  # noqa: E402
    uses_fp8_mma,
    values_transposed,
)
from pegboard.sdk.types import transpose_values  # noqa: E402
from test_decode_variants import DEVICE, paged_case, reference  # noqa: E402

FP8 = torch.float8_e4m3fn
MMA8 = [n for n, c in DECODE_VARIANTS.items() if c.fp8_mma]
#: (the two-stream variants have their own, cheaper cases below)
MMA8_ONE_STREAM = [n for n in MMA8 if DECODE_VARIANTS[n].streams == 1]
#: Largest error of the e4m3 dots on these cases (values ~N(0, 1)); measured in the
#: interpreter: 0.05-0.07 (float16 dots over the same cache: ~1e-3).
ATOL = 0.12


@pytest.fixture(autouse=True)
def _exact_e4m3(monkeypatch):
    if not torch.cuda.is_available():
        exact_e4m3_in_interpreter(monkeypatch)


def run(name, lens, splits, hdp, page_size=4, head_dim=32, heads=4, kv_heads=2, dtype=None, **kw):
    """The largest error of variant `name` against float32 attention over the same e4m3 cache,
    after checking it against `reference_decode_fp8mma` (for `fp8_mma` kernels): float32
    queries (and output) agree to float32 rounding (measured: 2e-7), bf16 ones to the output's
    bf16 rounding (on a GPU, plus 2^-7 of the largest value: a probability's rounding flips)."""
    dtype = dtype or torch.bfloat16
    q, k, v, table, seq = paged_case(lens, heads, kv_heads, head_dim, page_size, dtype, FP8)
    if hdp:
        v = transpose_values(v)
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, table, seq, scale, out, num_splits=splits, config=name, **kw)
    has_keys = seq > 0
    config = DECODE_VARIANTS[name]
    if uses_fp8_mma(config, k, v):
        block_n = kw.get("block_n") or (config.block_n if head_dim <= 128 else 64)
        args = (q.cpu(), k.cpu(), v.cpu(), table.cpu(), seq.cpu(), scale, splits)
        mimic = reference_decode_fp8mma(*args, block_n, config.min_chunk, config.streams)
        mimic = mimic[has_keys.cpu()]
        rounding = 1e-5 if dtype == torch.float32 else 2**-7  # (bf16: half an ulp is 2^-8)
        allowed = mimic.abs() * rounding + 1e-5
        if q.is_cuda:  # other summation orders and exp2: a probability may round to the next
            # e4m3 value (1/8 apart) now and then, moving the output by its share of the mass
            # times a value; measured on the H200 (2026-12-01, Qwen shape): 2.9e-3 x max |v|
            allowed += v.float().abs().amax().cpu() * 2**-7
        err = ((out[has_keys].float().cpu() - mimic).abs() / allowed).max()
        assert err <= 1, f"{name}: {err:.3g}x the rounding from the emulated e4m3 arithmetic"
    want = reference(q, k, v, table, seq, scale)[has_keys]
    return (out[has_keys].float() - want).abs().max().item()


LENS = [100, 3, 0, 37]


#: Without a GPU, one variant per design: the first e4m3 tile (`mma8`, values through
#: ldmatrix), `v_tile`, the engine's default (`row_sum_once`; every `FP8_MMA_DEFAULTS` variant
#: runs), `lean_addr` with and without page prefetch, and two KV heads per program; the others
#: (`make test-experimental`) differ from one of these in `block_n`, stages or page prefetch
#: (the `gpu` test runs every variant).
FP8_MMA_DESIGNS = ["mma8-bn128-s3-fast-pf", "mma8v-bn64-s4-fast-pf", "mma8vl-bn64-s3-fast-pf",
                   "mma8vl-bn64-s3-fast-pf-lean", "mma8vl-bn64-s5-fast-lean",
                   "mma8vl-hp2-bn64-s2-fast-pf-lean"]  # fmt: skip


# (without a GPU one variant per distinct interpreted kernel: `fixtures/decode_variants.py`)
@pytest.mark.parametrize(
    "name",
    [
        n if n in FP8_MMA_DESIGNS or n in ENGINE or torch.cuda.is_available()
        else pytest.param(n, marks=pytest.mark.experimental)
        for n in interpreted(MMA8_ONE_STREAM, fp8_cache=True)
    ],
)  # fmt: skip
def test_fp8_mma_variants_match_the_reference_over_transposed_values(name):
    assert run(name, LENS, 1, hdp=True) < ATOL
    assert run(name, LENS, 3, hdp=True, page_size=16) < ATOL
    assert run(name, LENS, 3, hdp=True, page_size=16, dtype=torch.float32) < ATOL
    assert run(name, [300, 129, 64], 4, hdp=True, page_size=8, dtype=torch.float32) < ATOL


def test_fp8_mma_reads_nhd_values_too_and_its_error_is_stated():
    """Over NHD values (the strided path) the result is the same; the 16-bit dots of
    `s4-fast-pf-f16` on the same cache are far closer (e4m3 Q and P cost the difference)."""
    mma = run("mma8-bn64-s4-fast-pf", LENS, 2, hdp=False)
    f16 = run("s4-fast-pf-f16", LENS, 2, hdp=False)
    assert mma < ATOL
    assert f16 < 1e-2
    assert mma > f16  # (the e4m3 query and probabilities are really used)


def test_lean_addressing_over_nhd_values_and_pages_that_do_not_tile_the_keys():
    """`lean_addr` masks page ids per page, not per key: over NHD values (per-key value
    pointers) keys past the end read a real page's stale bytes times p = 0; with a page size
    that does not divide the tile it is off (the per-key division)."""
    assert run("mma8vl-bn64-s3-fast-pf-lean", LENS, 2, hdp=False) < ATOL
    assert run("mma8vl-bn64-s5-fast-lean", LENS, 2, hdp=False, page_size=16) < ATOL
    assert run("mma8vl-bn64-s3-fast-pf-lean", LENS, 2, hdp=True, page_size=3) < ATOL


def test_two_kv_heads_per_program():
    """`hp2`: each program's tile holds the keys of two KV heads (each column's logits masked
    to its own head's); two programs per request, a group of 3 padded to 16 columns, NHD
    values, and 3 KV heads (not divisible: one head per program)."""
    name = "mma8vl-hp2-bn64-s2-fast-pf-lean"
    assert run(name, LENS, 2, hdp=True, page_size=16, heads=8, kv_heads=4) < ATOL
    assert run(name, LENS, 3, hdp=True, page_size=8, head_dim=24, heads=6) < ATOL
    assert run(name, LENS, 1, hdp=False, heads=8, kv_heads=4) < ATOL
    assert run(name, LENS, 2, hdp=True, page_size=16, heads=6, kv_heads=3) < ATOL


@pytest.mark.parametrize(
    "name",
    ["mma8vl-bn64-s3-fast-pf-lean", "mma8vl-bn128-s4-fast-lean", "mma8vl-hp2-bn64-s2-fast-pf-lean"],
)
def test_lean_reads_keys_past_the_end_unmasked_and_masks_their_logits(name):
    """`lean_addr` loads the key tile without a mask per key: a key slot past the end (stale,
    page 0's) may hold any byte, e4m3 NaN too, and must not reach the output."""
    q, k, v, table, seq = paged_case(LENS, 4, 2, 32, 4, torch.bfloat16, FP8)
    live = torch.zeros(k.shape[:2], dtype=torch.bool, device=k.device)
    for i, n in enumerate(seq.tolist()):
        for t in range(n):
            live[table[i, t // 4], t % 4] = True
    k.view(torch.uint8)[~live] = 0x7F  # e4m3fn NaN
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, transpose_values(v), table, seq, 32**-0.5, out, 2, config=name)
    want = reference(q, k, v, table, seq, 32**-0.5)[seq > 0]
    assert (out[seq > 0].float() - want).abs().max().item() < ATOL


#: Tiles per program (64-key tiles unsplit): 3 (odd: the last B tile past the end), under one,
#: none, exactly one (B never sees a key), 4 with the last one part-filled, 2
STREAM_LENS = [150, 3, 0, 64, 200, 100]


def test_two_softmax_streams_match_their_emulation_odd_even_and_short():
    """`streams=2`: tiles alternate between two online softmaxes merged at the end; the kernel
    follows `reference_decode_fp8mma(streams=2)` (float32: to float32 rounding) over odd and
    even tile counts, a masked last tile, a range under one tile and one that leaves the second
    stream empty; split in 3 (splits of one tile: every second stream empty) with a GQA
    group of 3; and launched longest first."""
    name, common = "mma8vl-bn64-s3-fast-pf-x2", {"kv_heads": 1, "hdp": True}  # (1 KV head: fast)
    assert run(name, STREAM_LENS, 1, page_size=16, heads=2, dtype=torch.float32, **common) < ATOL
    order = torch.tensor([4, 0, 5, 3, 1, 2], device=DEVICE)
    assert run(name, STREAM_LENS, 3, page_size=8, heads=3, order=order, **common) < ATOL


def test_two_streams_of_32_key_tiles_and_the_per_key_paths():
    """`bn32-x2` (64 keys per iteration, as the default), split; and with a page size that
    does not tile the keys (per-key page ids and value gathers) over NHD values."""
    one_kv_head = {"heads": 2, "kv_heads": 1}
    assert run("mma8vl-bn32-s3-fast-pf-x2", LENS, 2, hdp=True, page_size=16, **one_kv_head) < ATOL
    assert run("mma8vl-bn64-s2-fast-pf-x2", [150, 3, 64], 1, hdp=False, page_size=3,
               **one_kv_head) < ATOL  # fmt: skip


def test_group_of_three_head_dim_24_and_page_size_three():
    """Padded rows, a head size not a power of two, and a page size that does not tile the
    keys (the value tile then gathers per token)."""
    err = run("mma8-bn64-s4-fast-pf", LENS, 2, hdp=True, page_size=3, head_dim=24, heads=6)
    assert err < ATOL


def test_transposed_values_always_take_the_e4m3_kernel():
    """`decode.py`'s kernel reads values with unit stride along the head dimension: over a
    transposed value cache every variant runs the e4m3 kernel (and gets the right answer)."""
    k = torch.zeros(3, 16, 2, 32, dtype=FP8)
    v_nhd = torch.zeros(3, 16, 2, 32, dtype=FP8)
    v_hdp = transpose_values(v_nhd)
    assert values_transposed(v_hdp) and not values_transposed(v_nhd)
    base = DECODE_VARIANTS["s4-fast-pf-f16"]
    assert uses_fp8_mma(base, k, v_hdp) and not uses_fp8_mma(base, k, v_nhd)
    assert uses_fp8_mma(DECODE_VARIANTS["mma8-bn64-s4-fast-pf"], k, v_nhd)
    bf16 = torch.zeros(3, 16, 2, 32, dtype=torch.bfloat16)
    assert not uses_fp8_mma(DECODE_VARIANTS["mma8-bn64-s4-fast-pf"], bf16, bf16)
    assert run("s4-fast-pf-f16", LENS, 1, hdp=True) < ATOL


def test_the_engine_default_over_transposed_values_is_an_fp8_mma_variant():
    """Without a variant named, a decode over an `hdp` pool takes `FP8_MMA_DEFAULTS`, not the
    16-bit table's tile."""
    assert decode_config(256, e4m3_dots=True).fp8_mma
    assert decode_config(1, e4m3_dots=True).fp8_mma
    assert not decode_config(256).fp8_mma


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", MMA8)
def test_gpu_fp8_mma_on_the_qwen_shape(name):
    """Qwen3-0.6B's decode shape (16/8 heads, head size 128, page 16) compiled, split and not."""
    lens = [
        int(x) for x in torch.randint(100, 1100, (48,), generator=torch.Generator().manual_seed(0))
    ]
    for splits in (1, 4):
        err = run(name, lens, splits, hdp=True, page_size=16, head_dim=128, heads=16, kv_heads=8)
        assert err < ATOL, (name, splits, err)
