"""The premise of `fixtures/decode_variants.interpreted`, which the interpreter tests of every
decode variant (`test_decode_variants.py`, `test_decode_fp8mma.py`) run one variant per group
of: every variant of a group launches the same kernels with the same arguments as the group's
tested variant, but for `num_warps` and `num_stages`, which the interpreter ignores. The
launches are recorded, not run (no kernel runs here).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.decode_variants import interpreted, interpreted_key  # noqa: E402
from pegboard.plugins.kernels.triton_attention import decode as decode_module  # noqa: E402
from pegboard.plugins.kernels.triton_attention import decode_fp8mma  # noqa: E402
from pegboard.plugins.kernels.triton_attention.decode_configs import (  # noqa: E402
    DECODE_VARIANTS,
)
from pegboard.sdk.types import transpose_values  # noqa: E402
from test_decode_variants import LENS, paged_case  # noqa: E402

FP8 = torch.float8_e4m3fn
MMA8 = [n for n, c in DECODE_VARIANTS.items() if c.fp8_mma]


class Recorder:
    """Stands in for a `@triton.jit` kernel: `kernel[grid](*args, **kw)` records the launch."""

    def __init__(self, name: str, launches: list) -> None:
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        def launch(*args, num_warps=None, num_stages=None, **kw):
            args = [
                (a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
                for a in args
            ]
            self.launches.append((self.name, tuple(grid), args, sorted(kw.items())))

        return launch


def launches(monkeypatch, name: str, cases) -> list:
    """The kernel launches `decode_attention` makes for variant `name` over `cases` (the
    arguments of `paged_case`, the splits, whether values are transposed)."""
    out: list = []
    for module, kernel in ((decode_module, "_decode_kernel"),
                           (decode_module, "_decode_reduce_kernel"),
                           (decode_fp8mma, "_decode_fp8mma_kernel")):  # fmt: skip
        monkeypatch.setattr(module, kernel, Recorder(kernel, out))
    for case, splits, hdp in cases:
        q, k, v, table, lens = paged_case(*case)
        if hdp:
            v = transpose_values(v)
        result = torch.empty_like(q)
        decode_module.decode_attention(q, k, v, table, lens, 0.25, result, splits, config=name)
    return out


#: `test_decode_variants.check`'s cases for the every-variant test (float32, unsplit and split)
CASES_16 = [((LENS, 4, 2, 16, 4, torch.float32, torch.float32), s, False) for s in (1, 3)]
#: `test_decode_fp8mma.run`'s cases for the every-`fp8_mma`-variant test
CASES_8 = [
    ((LENS, 4, 2, 32, 4, torch.bfloat16, FP8), 1, True),
    ((LENS, 4, 2, 32, 16, torch.bfloat16, FP8), 3, True),
    ((LENS, 4, 2, 32, 16, torch.float32, FP8), 3, True),
    (([300, 129, 64], 4, 2, 32, 8, torch.float32, FP8), 4, True),
]


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU every variant runs")
@pytest.mark.parametrize(
    ("names", "fp8_cache", "cases"),
    [(list(DECODE_VARIANTS), False, CASES_16), (MMA8, True, CASES_8)],
    ids=["16-bit", "fp8_mma"],
)
def test_each_variant_launches_what_its_tested_variant_does(monkeypatch, names, fp8_cache, cases):
    tested = interpreted(names, fp8_cache)
    assert len(tested) < len(names)
    for name in names:
        key = interpreted_key(DECODE_VARIANTS[name], fp8_cache)
        (rep,) = [t for t in tested if interpreted_key(DECODE_VARIANTS[t], fp8_cache) == key]
        assert launches(monkeypatch, name, cases) == launches(monkeypatch, rep, cases), (name, rep)
