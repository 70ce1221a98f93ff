"""Rank 0's shared-memory plan channel (core/distributed/shm_broadcast.py): messages arrive in
order across ring wrap-arounds, a message too large for a slot goes the other way, and a writer
whose reader stopped reading fails instead of overwriting an unread slot."""

import queue
import threading

import pytest
from pegboard.core.distributed.shm_broadcast import ShmBroadcast


def _reader_of(writer: ShmBroadcast) -> ShmBroadcast:
    return ShmBroadcast(writer.shm, writer.readers, writer.slots, writer.slot_bytes, reader=0)


def test_messages_arrive_in_order_through_many_wraps_and_large_ones_spill():
    writer = ShmBroadcast.create(readers=1, slots=2, slot_bytes=256)
    reader = _reader_of(writer)
    side = queue.Queue()  # stands in for the plan group (gloo) a spilled message takes
    got = []

    def follow():
        while (msg := reader.read(side.get)) != "stop":
            got.append(msg)

    thread = threading.Thread(target=follow)
    thread.start()
    sent = [("forward", [i] * (i % 7)) for i in range(50)]
    sent.insert(20, ("bind", list(range(500))))  # > 256 bytes pickled: spilled
    for msg in sent:
        writer.write(msg, side.put, timeout_s=60)
    writer.write("stop", side.put, timeout_s=60)
    thread.join(60)
    assert got == sent
    writer.close()


def test_a_writer_does_not_overwrite_a_slot_nobody_read():
    writer = ShmBroadcast.create(readers=1, slots=2, slot_bytes=64)
    writer.write("a", None, timeout_s=1)
    writer.write("b", None, timeout_s=1)
    with pytest.raises(TimeoutError, match="a follower to read"):
        writer.write("c", None, timeout_s=0.05)
    assert _reader_of(writer).read(None) == "a"  # message 1 is still there
    writer.close()
