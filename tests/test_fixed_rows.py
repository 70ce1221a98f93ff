"""`kernels.fixed_rows`: dense linears of any row count handed to cuBLAS at a fixed set of row
counts (a new one costs cuBLAS host work to choose a kernel: ~0.2-1.4 ms per shape on the H200),
for an EAGLE head's large, irregular catch-up forwards (`dense.linear_fixed_rows`)."""

import pytest
import torch
import torch.nn.functional as F
from pegboard.core.kernels import dense, fixed_rows
from pegboard.core.kernels.fixed_rows import MAX_PIECE, MIN_PIECE, SIZES, pieces


@pytest.mark.parametrize("rows", [257, 300, 511, 512, 768, 5188, 8192, 8193, 2 * 8192 + 4155])
def test_pieces_cover_every_row_with_the_fixed_sizes_only(rows):
    parts = pieces(rows)
    assert {n for _, n in parts} <= set(SIZES)
    covered = torch.zeros(rows, dtype=torch.int64)
    for start, n in parts:
        assert 0 <= start and start + n <= rows
        covered[start : start + n] += 1
    assert covered.min() >= 1  # every row computed
    assert parts[-1][0] + parts[-1][1] == rows
    # whole MAX_PIECE pieces, then at most one of each smaller size, and one overlapping piece
    assert len(parts) <= rows // MAX_PIECE + len(SIZES) + 1


def test_pieces_overlap_only_to_finish_a_remainder_under_the_smallest_size():
    assert pieces(4096 + 512) == [(0, 4096), (4096, 512)]  # no row twice
    rows = 4096 + 300  # 4096, 256, and the last 44 rows in a piece of 256 that ends at the last row
    assert pieces(rows) == [(0, 4096), (4096, 256), (rows - MIN_PIECE, MIN_PIECE)]
    with pytest.raises(ValueError, match="more than"):
        pieces(MIN_PIECE)


@pytest.mark.parametrize("rows", [7, 256, 257, 1000, 8192 + 300])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_equals_f_linear(rows, bias):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 48, generator=g), torch.randn(40, 48, generator=g)
    b = torch.randn(40, generator=g) if bias else None
    got = dense.linear_fixed_rows(x, w, b)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_linear_hands_cublas_only_the_fixed_sizes(monkeypatch):
    seen = []
    mm, addmm = torch.mm, torch.addmm
    monkeypatch.setattr(
        torch, "mm", lambda a, b, out: (seen.append(a.shape[0]), mm(a, b, out=out))[1]
    )
    monkeypatch.setattr(
        torch, "addmm", lambda c, a, b, out: (seen.append(a.shape[0]), addmm(c, a, b, out=out))[1]
    )
    w = torch.randn(16, 8)
    for rows in (300, 777, 5188, 9001):
        fixed_rows.linear_in_pieces(torch.randn(rows, 8), w, torch.randn(16))
        dense.linear_fixed_rows(torch.randn(rows, 8), w)
    assert seen and set(seen) <= set(SIZES)


def test_warm_up_meets_every_size_once_per_distinct_weight_shape(monkeypatch):
    monkeypatch.setattr(fixed_rows, "_warm", set())
    seen = []
    mm, addmm = torch.mm, torch.addmm
    monkeypatch.setattr(
        torch, "mm", lambda a, b, out: (seen.append((a.shape[0], b.shape)), mm(a, b, out=out))[1]
    )
    monkeypatch.setattr(
        torch,
        "addmm",
        lambda c, a, b, out: (seen.append((a.shape[0], "bias")), addmm(c, a, b, out=out))[1],
    )
    w, other = torch.randn(16, 8), torch.randn(24, 8)
    fixed_rows.warm_up([(w, None), (w.clone(), None), (other, None), (w, torch.randn(16))])
    for kind in (w.t().shape, other.t().shape, "bias"):
        assert {n for n, k in seen if k == kind} == set(SIZES)
    assert len([1 for n, k in seen if k == w.t().shape and n == MAX_PIECE]) == 1  # once per shape
    seen.clear()
    fixed_rows.warm_up([(torch.randn(16, 8), None)])  # (another layer of a shape met before)
    assert not seen


@pytest.mark.gpu
def test_gpu_linear_matches_f_linear_in_bf16_after_warm_up():
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(1024, 3072, device="cuda", dtype=torch.bfloat16, generator=g) / 64
    b = torch.randn(1024, device="cuda", dtype=torch.bfloat16, generator=g)
    fixed_rows.warm_up([(w, None), (w, b)])
    for rows in (300, 5188, 2 * 8192 + 4155):
        x = torch.randn(rows, 3072, device="cuda", dtype=torch.bfloat16, generator=g)
        for bias in (None, b):
            got, want = dense.linear_fixed_rows(x, w, bias), F.linear(x, w, bias)
            torch.testing.assert_close(
                got, want, rtol=1.6e-2, atol=1.6e-2 * want.abs().max().item()
            )
