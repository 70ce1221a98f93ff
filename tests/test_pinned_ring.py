"""The pinned staging ring behind `pegboard.sdk.device.to_device` / `upload` (sdk/device.py).

On CUDA the ring's memory is pinned and its markers are CUDA events; here it runs on plain
host memory with stand-in events and one stand-in stream, which is enough to check what the
ring itself promises: every upload arrives intact, no upload straddles a segment, a segment is
written again only after the copies queued from it on the previous lap were waited for, and
an upload larger than a segment is refused (the caller then pins as before).
"""

from __future__ import annotations

import torch
from pegboard.sdk.device import PinnedRing


class Event:
    created: list[Event] = []

    def __init__(self) -> None:
        self.recorded = False
        self.synchronized = False
        Event.created.append(self)

    def record(self, stream) -> None:
        self.recorded = True

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
