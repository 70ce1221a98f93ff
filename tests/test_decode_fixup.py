"""Split decode without the reduce launch (`DecodeConfig.fixup`, variants `s3-pf-fix` and
`s3-pf-fix-pdl`): the last split of each (request, KV heads) to finish merges the splits with
the reduce kernel's code, so the output equals the two-launch variant's bit for bit in the
interpreter and to one bf16 ulp on the H200 (two kernels compiled apart; 1 of 4,096 values); the
counters are zero again after every launch (CUDA-graph replays), and a workspace without
counters falls back to the reduce kernel.

Without a GPU the kernel runs in Triton's CPU interpreter (tiny shapes, programs one after
another); the `gpu` tests run Llama-3.1-8B's batch-1 shapes and CUDA-graph replays.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.decode_variants import interpreted  # noqa: E402
from pegboard.plugins.kernels.triton_attention import decode as decode_module  # noqa: E402
from pegboard.plugins.kernels.triton_attention.decode import (  # noqa: E402
    decode_attention,
    decode_workspace,
)
from pegboard.plugins.kernels.triton_attention.decode_configs import MAX_SPLITS  # noqa: E402
from test_decode_variants import DEVICE, LENS, paged_case, reference  # noqa: E402

FIX = ["s3-pf-fix", "s3-pf-fix-pdl"]


@pytest.fixture
def reduce_launches(monkeypatch):
    """Grids of each launch of the separate reduce kernel."""
    grids: list[tuple] = []
    real = decode_module._decode_reduce_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]

    monkeypatch.setattr(decode_module, "_decode_reduce_kernel", Spy())
    return grids


def run(name, case, splits, workspace=None):
    q, k, v, table, lens = case
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, table, lens, q.shape[-1] ** -0.5, out, num_splits=splits,
                     workspace=workspace, config=name)  # fmt: skip
    return out


# (without a GPU `s3-pf-fix-pdl` is `s3-pf-fix`: no PDL in the interpreter)
@pytest.mark.parametrize("name", interpreted(FIX, fp8_cache=False))
@pytest.mark.parametrize("splits", [3, MAX_SPLITS])
def test_fixup_equals_the_reduce_launch_bit_for_bit(name, splits, reduce_launches):
    case = paged_case(LENS, 4, 2, 16, 4, torch.float32, torch.float32)
    expected = run("s3-pf", case, splits)
    assert len(reduce_launches) == 1
    work = decode_workspace(len(LENS), 4, splits, 16, DEVICE)
    out = run(name, case, splits, work)
    assert len(reduce_launches) == 1  # no second launch
    torch.testing.assert_close(out, expected, atol=0, rtol=0, equal_nan=True)
    has_keys = case[4] > 0
    want = reference(*case, 16**-0.5)
    torch.testing.assert_close(out[has_keys], want[has_keys], atol=1e-4, rtol=0)
    assert not out[~has_keys].isnan().any()  # a padded row gets zeros, as from the reduce
    assert not work[2].any()  # counters back to zero for the next launch
    torch.testing.assert_close(run(name, case, splits, work), out, atol=0, rtol=0)


def test_fixup_without_counters_or_splits_launches_as_before(reduce_launches):
    case = paged_case(LENS, 4, 2, 16, 4, torch.float32, torch.float32)
    expected = run("s3-pf", case, 3)
    mid_out, mid_lse, _ = decode_workspace(len(LENS), 4, 3, 16, DEVICE)
    out = run("s3-pf-fix", case, 3, (mid_out, mid_lse))  # a workspace of two: the reduce
    assert len(reduce_launches) == 2
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    unsplit = run("s3-pf-fix", case, 1)  # (a padded row: 0 / 0, as before)
    torch.testing.assert_close(unsplit, run("s3-pf", case, 1), atol=0, rtol=0, equal_nan=True)
    assert len(reduce_launches) == 2


# ------------------------------------------------------------------ GPU, Llama-3.1-8B batch 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", FIX)
@pytest.mark.parametrize("seq_len", [129, 384, 4096])
@pytest.mark.parametrize("splits", [3, MAX_SPLITS])
def test_gpu_llama_batch_one_fixup_bit_for_bit(name, seq_len, splits, reduce_launches):
    case = paged_case([seq_len], 32, 8, 128, 16, torch.bfloat16, torch.bfloat16)
    expected = run("s3-pf", case, splits)
    work = decode_workspace(1, 32, splits, 128, DEVICE)
    out = run(name, case, splits, work)
    assert len(reduce_launches) == 1
    torch.testing.assert_close(out, expected, atol=0, rtol=0)
    assert not work[2].any()


@pytest.mark.gpu
@pytest.mark.parametrize("name", FIX)
def test_gpu_fixup_replays_from_a_cuda_graph_over_new_lengths(name):
    q, k, v, table, lens = paged_case([4096], 32, 8, 128, 16, torch.bfloat16, torch.bfloat16)
    work = decode_workspace(1, 32, MAX_SPLITS, 128, DEVICE)
    out = torch.empty_like(q)
    scale = 128**-0.5

    def call():
        decode_attention(q, k, v, table, lens, scale, out, MAX_SPLITS, work, config=name)

    call()  # compile
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for n in (130, 700, 4096, 17):
        lens.fill_(n)
        q.normal_()
        graph.replay()
        expected = torch.empty_like(q)
        decode_attention(q, k, v, table, lens, scale, expected, MAX_SPLITS, config="s3-pf")
        # one bf16 ulp (module docstring; H200, 2026-12-01)
        torch.testing.assert_close(out, expected, atol=0, rtol=2**-7)
        assert not work[2].any()
