"""The pinned staging ring behind `pegboard.sdk.device.to_device` / `upload` (sdk/device.py).

On CUDA the ring's memory is pinned and its markers are CUDA events; here it runs on plain
host memory with stand-in events and one stand-in stream, which is enough to check what the
ring itself promises: every upload arrives intact, no upload straddles a segment, a segment is
written again only after the copies queued from it on the previous lap were waited for, and
an upload larger than a segment is refused (the caller then pins as before).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pegboard.sdk.device import PinnedRing


class Event:
    created: list[Event] = []

    def __init__(self) -> None:
        self.recorded = False
        self.stream = None
        self.synchronized = False
        Event.created.append(self)

    def record(self, stream) -> None:
        self.recorded = True
        self.stream = stream

    def synchronize(self) -> None:
        assert self.recorded, "waited for an event that was never recorded"
        self.synchronized = True


def make_ring(nbytes=4096, segments=4) -> PinnedRing:
    Event.created = []
    return PinnedRing(
        torch.device("cpu"), nbytes, segments, pinned=False, events=Event, stream=lambda: "s"
    )


def test_uploads_arrive_intact_over_several_laps():
    ring = make_ring()
    gen = torch.Generator().manual_seed(0)
    for i in range(200):
        src = torch.randint(0, 1 << 30, (int(torch.randint(1, 90, (1,), generator=gen)),))
        out = ring.upload(src, torch.empty_like(src))
        assert torch.equal(out, src), i
    assert ring.waits > 0  # it went round more than once


def test_a_segment_is_reused_only_after_its_last_laps_copies_were_waited_for():
    ring = make_ring()
    reused = []
    for i in range(120):
        before = ring.segment
        start_events = list(ring.left[(before + 1) % ring.segments])
        src = torch.full((40,), i, dtype=torch.int64)  # 320 bytes: 3 per segment
        ring.upload(src, torch.empty_like(src))
        if ring.segment != before:  # moved on: the events of the last lap there were waited
            assert all(e.synchronized for e in start_events)
            reused.append(bool(start_events))
    assert any(reused)
    # every event except those of segments not yet reached again was waited for
    pending = sum(len(x) for x in ring.left)
    assert sum(not e.synchronized for e in Event.created) == pending


def test_a_segment_left_records_one_event_on_every_stream_its_copies_went_to():
    """Copies of one segment queued on two streams (a side stream and the main one): leaving
    it records an event on each, once, so the next lap waits for both."""
    current = ["main"]
    Event.created = []
    ring = PinnedRing(torch.device("cpu"), 1024, 4, pinned=False, events=Event,
                      stream=lambda: current[0])  # fmt: skip
    src = torch.zeros(8, dtype=torch.int64)  # 64 bytes: 4 per 256-byte segment
    for name in ("main", "side", "main", "side"):
        current[0] = name
        ring.upload(src, torch.empty_like(src))
    assert Event.created == []  # still in the first segment
    ring.upload(src, torch.empty_like(src))  # leaves it
    assert sorted(e.stream for e in ring.left[0]) == ["main", "side"]


def test_no_upload_straddles_a_segment():
    ring = make_ring(nbytes=1024, segments=4)  # 256-byte segments
    for n in (30, 17, 25, 31, 8, 29, 2, 32, 32, 32):
        src = torch.zeros(n, dtype=torch.int64)
        ring.upload(src, torch.empty_like(src))
        end = ring.offset
        start = end - n * 8
        assert start // 256 == (end - 1) // 256, (start, end)


def test_an_upload_larger_than_a_segment_is_refused():
    ring = make_ring(nbytes=1024, segments=4)
    big, small = torch.zeros(33, dtype=torch.int64), torch.zeros(32, dtype=torch.int64)
    assert ring.upload(big, torch.empty_like(big)) is None  # 264 bytes > 256
    assert ring.upload(small, torch.empty_like(small)) is not None


def test_upload_into_a_kept_tensor_converts_and_fills_it():
    ring = make_ring()
    dst = torch.zeros(2, 3, dtype=torch.int32)
    ring.upload(torch.arange(6, dtype=torch.int32).reshape(2, 3), dst)
    assert dst.tolist() == [[0, 1, 2], [3, 4, 5]]


def test_numpy_sources_of_every_staged_dtype_arrive_intact():
    """Numpy arrays (the runner's and the attention backend's uploads) are staged through a
    numpy view of the ring: values, dtypes and shapes arrive as they were, 2-D ones into a
    strided destination too (the backend's page-table rows)."""
    ring = make_ring(nbytes=1 << 16)
    rng = np.random.default_rng(0)
    for dtype in (np.int64, np.int32, np.int16, np.int8, np.uint8, np.float64, np.float32):
        src = (rng.standard_normal((3, 5)) * 100).astype(dtype)
        dst = torch.empty(3, 5, dtype=torch.from_numpy(src).dtype)
        assert torch.equal(ring.upload(src, dst), torch.from_numpy(src)), dtype
    flags = rng.random(7) > 0.5
    assert ring.upload(flags, torch.empty(7, dtype=torch.bool)).tolist() == flags.tolist()
    table = np.arange(12, dtype=np.int32).reshape(3, 4)
    wide = torch.full((5, 8), -1, dtype=torch.int32)
    ring.upload(table, wide[:3, :4])  # rows of a wider tensor, as the backend writes them
    assert wide[:3, :4].tolist() == table.tolist() and (wide[3:] == -1).all()
    assert (wide[:, 4:] == -1).all()


def test_sources_without_a_numpy_twin_and_conversions_still_arrive():
    ring = make_ring()
    bf16 = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)  # torch views of the ring
    assert torch.equal(ring.upload(bf16, torch.empty_like(bf16)), bf16)
    dst = torch.empty(4, dtype=torch.float32)  # int64 into float32: `copy_` converts
    assert ring.upload(np.arange(4, dtype=np.int64), dst).tolist() == [0.0, 1.0, 2.0, 3.0]


def test_to_devices_numpy_conversion_is_torch_as_tensors():
    """`to_device` builds lists-with-a-dtype and numpy arrays with numpy on CUDA: the same
    values and dtype as `torch.as_tensor`, or None where torch decides otherwise."""
    from pegboard.sdk.device import _as_array

    cases = [
        ([1, 2, 3], torch.int64),
        ([0, 2, 0], torch.bool),
        ([0.1, 1e-8, 3.3], torch.float32),
        ([[1, 2], [3, 4]], torch.int32),
        (np.array([1.5, 2.5]), None),
        (np.array([1.1, 2.7]), torch.float32),
        (np.arange(5, dtype=np.int64), torch.int32),
    ]
    for values, dtype in cases:
        array = _as_array(values, dtype)
        want = torch.as_tensor(values, dtype=dtype)
        got = torch.from_numpy(array)
        assert got.dtype == want.dtype and torch.equal(got, want), (values, dtype)
    assert _as_array([1.0, 2.0], None) is None  # torch: float32, numpy: float64
    assert _as_array([1.0], torch.bfloat16) is None  # no numpy twin
    assert _as_array(torch.arange(3), torch.int64) is None  # tensors stay tensors


@pytest.mark.gpu
def test_gpu_uploads_do_not_wait_for_the_queued_work():
    """Uploads made while the stream is busy (a `_sleep` kernel of ~0.5 s) return before that
    kernel ends: the ring's numpy-staged memory is pinned as far as the driver is concerned (a
    pageable source would make `cudaMemcpyAsync` wait for the stream); after it, every upload
    holds its values."""
    from pegboard.sdk.device import to_device, upload

    dev = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)  # clock cycles
    busy = torch.cuda.Event()
    busy.record()
    ids = to_device(np.arange(1000, dtype=np.int64), dev)  # the runner's kind
    rows = to_device([3, 1, 2], dev, torch.int64)  # a list with a dtype
    table = upload(
        np.arange(20, dtype=np.int32).reshape(4, 5),
        torch.empty(4, 5, dtype=torch.int32, device=dev),
    )
    bf16 = to_device(torch.tensor([1.5, 2.5], dtype=torch.bfloat16), dev)  # torch-staged
    assert not busy.query(), "an upload waited for the kernel queued before it"
    torch.cuda.synchronize()
    assert ids.cpu().tolist() == list(range(1000)) and rows.cpu().tolist() == [3, 1, 2]
    assert table.cpu().flatten().tolist() == list(range(20))
    assert bf16.cpu().tolist() == [1.5, 2.5]
