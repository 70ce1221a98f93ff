"""Decode programs launched longest request first (`decode.launch_order`): the order a launch
starts its programs in changes nothing in the output, bit for bit, for every kernel family
(16-bit dots, several KV heads per program, splits with the reduce kernel or the fix-up, the
e4m3 tensor-core kernel), and the `triton` backend sorts once per step, again for a capture.

Without a GPU the kernels run in Triton's CPU interpreter (tiny shapes).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.interpreter_fp8 import exact_e4m3_in_interpreter  # noqa: E402
from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend  # noqa: E402
from pegboard.plugins.kernels.triton_attention import decode as decode_module  # noqa: E402
from pegboard.plugins.kernels.triton_attention.decode import (  # noqa: E402
    decode_attention,
    launch_order,
)
from pegboard.sdk.types import transpose_values  # noqa: E402
from test_attention_triton import make_case  # noqa: E402
from test_decode_variants import DEVICE, paged_case  # noqa: E402

FP8 = torch.float8_e4m3fn
LENS = [37, 3, 0, 100, 64, 17]  # uneven, a padded row of length 0, none in order


@pytest.fixture
def ordering_on(monkeypatch):
    monkeypatch.setattr(decode_module, "DECODE_ORDER", True)
    monkeypatch.setattr(decode_module, "ORDER_MIN_REQUESTS", 2)


def both_orders(name, splits, kv_dtype=torch.float32, hdp=False, **kw):
    """The kernel's output in row order and launched in a scrambled order."""
    q, k, v, table, lens = paged_case(LENS, 4, 2, 16, 4, torch.float32, kv_dtype)
    if hdp:
        v = transpose_values(v)
    outs = []
    for order in (None, torch.tensor([3, 5, 0, 2, 4, 1], device=DEVICE)):
        out = torch.full_like(q, float("nan"))
        decode_attention(q, k, v, table, lens, 0.25, out, splits, config=name, order=order, **kw)
        outs.append(out)
    return outs, lens


@pytest.mark.parametrize(
    ("name", "splits"),
    [("s3-fast-pf", 1), ("hp2-s3-fast-pf", 1), ("s3-pf", 3), ("s3-pf-fix", 3), ("baseline", 2)],
)
def test_any_launch_order_gives_the_same_bits(name, splits):
    (plain, ordered), lens = both_orders(name, splits)
    assert not plain[lens > 0].isnan().any()
    # (a row without keys too: left unwritten, or the reduce kernel's zeros, alike)
    torch.testing.assert_close(ordered, plain, atol=0, rtol=0, equal_nan=True)


def test_the_e4m3_tensor_core_kernel_launches_in_any_order_too(monkeypatch):
    if not torch.cuda.is_available():
        exact_e4m3_in_interpreter(monkeypatch)
    for splits in (1, 2):
        (plain, ordered), lens = both_orders(
            "mma8vl-bn64-s3-fast-pf", splits, kv_dtype=FP8, hdp=True
        )
        torch.testing.assert_close(ordered[lens > 0], plain[lens > 0], atol=0, rtol=0)


def test_launch_order_is_longest_first_and_off_for_small_batches(monkeypatch):
    lens = torch.tensor([5, 90, 0, 41, 41, 7, 300], dtype=torch.int32, device=DEVICE)
    assert decode_module.DECODE_ORDER  # on by default (PEGBOARD_DECODE_ORDER=0: off)
    assert launch_order(lens, decode_module.ORDER_MIN_REQUESTS - 1) is None
    monkeypatch.setattr(decode_module, "ORDER_MIN_REQUESTS", 4)
    order = launch_order(lens, 7)
    assert sorted(order.tolist()) == list(range(7))
    assert lens[order].tolist() == sorted(lens.tolist(), reverse=True)
    assert launch_order(lens, 3) is None
    monkeypatch.setattr(decode_module, "DECODE_ORDER", False)
    assert launch_order(lens, 7) is None
    monkeypatch.setattr(decode_module, "DECODE_ORDER", True)
    buffers = (torch.zeros(8, dtype=torch.int32, device=DEVICE),
               torch.zeros(8, dtype=torch.int64, device=DEVICE))  # fmt: skip
    into = launch_order(lens, 5, buffers)  # the first 5 rows only, sorted into the buffers
    assert into.data_ptr() == buffers[1].data_ptr()
    assert lens[into].tolist() == [90, 41, 41, 5, 0]


def test_the_backend_sorts_once_per_step_and_matches_row_order(monkeypatch, ordering_on):
    """Every layer of a step launches with the order sorted at its first layer (one sort a
    step); the next `prepare` sorts again; the outputs equal the unordered backend's."""
    case = make_case([30, 2, 61, 9], [1, 1, 1, 1], page_size=4)
    sorts, orders = [], []
    real_sort, real_decode = decode_module.launch_order, decode_module.decode_attention

    def counting_sort(*args, **kw):
        sorts.append(1)
        return real_sort(*args, **kw)

    def recording_decode(*args, **kw):
        orders.append(kw.get("order"))
        return real_decode(*args, **kw)

    backend = TritonAttentionBackend(case.info, case.pool)
    monkeypatch.setattr(backend.kernels, "launch_order", counting_sort)
    monkeypatch.setattr(backend.kernels, "decode_attention", recording_decode)
    backend.prepare(case.batch)
    outs = [backend.forward(layer, case.q, case.k, case.v) for layer in (0, 1)]
    assert len(sorts) == 1 and orders[0] is orders[1]
    assert orders[0].tolist() == [2, 0, 3, 1]  # longest first
    backend.prepare(case.batch)
    backend.forward(0, case.q, case.k, case.v)
    assert len(sorts) == 2
    monkeypatch.setattr(decode_module, "DECODE_ORDER", False)
    plain = TritonAttentionBackend(case.info, case.pool)
    plain.prepare(case.batch)
    for layer, out in zip((0, 1), outs):
        want = plain.forward(layer, case.q, case.k, case.v)
        torch.testing.assert_close(out, want, atol=0, rtol=0)


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_graph_replays_its_sort_with_each_steps_lengths(ordering_on):
    """A captured decode launch sorts inside the graph: replayed after the lengths changed
    (the longest request now another), it gives the eager, row-order output; no host sync."""
    case = make_case([300, 20, 700, 5, 64, 1000, 130, 9], [1] * 8, 16, 16, 8, 128,
                     torch.bfloat16, layers=1)  # fmt: skip
    backend = TritonAttentionBackend(case.info, case.pool)
    backend.prepare_for_capture(8)
    backend.prepare(case.batch)
    backend.attend(0, case.q)  # warm-up, eager (compiles)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = backend.attend(0, case.q)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    backend.seq_lens[:8] = torch.tensor([9, 801, 40, 6, 64, 2, 130, 9], device=DEVICE)
    graph.replay()
    torch.cuda.synchronize()
    assert backend.order_buffers[1][:8].tolist()[:2] == [1, 6]  # sorted at replay
    plain = TritonAttentionBackend(case.info, case.pool)
    plain.prepare(case.batch)
    plain.seq_lens[:8] = backend.seq_lens[:8]
    decode_module.DECODE_ORDER = False
    try:
        want = plain.attend(0, case.q)
    finally:
        decode_module.DECODE_ORDER = True
    torch.testing.assert_close(out, want, atol=0, rtol=0)
