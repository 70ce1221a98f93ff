"""Rank 0's per-step messages to the followers of its node through shared memory.

The plan group (gloo over loopback TCP) costs two collectives per message: a size, then the
pickled bytes, each a socket round trip through the kernel and both processes' schedulers —
hundreds of µs on a quiet host, milliseconds on a busy one, paid on every decode step of a
tensor-parallel engine. On one node the leader instead writes each pickled message into a ring
of slots in a shared-memory block and each follower polls its next slot (vLLM's shared-memory
message queue follows the same idea). Messages larger than a slot, and groups spanning nodes,
still go over the plan group.

Layout: a header of `slots` sequence numbers and lengths, then one 8-byte read counter per
reader, then the slots. The writer fills slot `k % slots` with message `k` once every reader has
read message `k - slots`, then publishes `k` as the slot's sequence number (x86 keeps stores in
order, and the payload is written before the sequence number).
"""

from __future__ import annotations

import pickle
import time
from multiprocessing import resource_tracker, shared_memory

import numpy as np

#: A slot's length field for "this message did not fit; read it from the plan group".
SPILLED = np.uint64(2**64 - 1)


class ShmBroadcast:
    """One writer (rank 0) and `readers` followers of one node; see the module docstring."""

    def __init__(
        self,
        shm: shared_memory.SharedMemory,
        readers: int,
        slots: int,
        slot_bytes: int,
        reader: int | None,
    ) -> None:
        self.shm = shm
        self.readers = readers
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.reader = reader  # None for the writer, else this follower's index
        buf = shm.buf
        self._seq = np.ndarray((slots,), np.uint64, buf, 0)
        self._len = np.ndarray((slots,), np.uint64, buf, 8 * slots)
        self._read = np.ndarray((readers,), np.uint64, buf, 16 * slots)
        self._data = 16 * slots + 8 * readers
        self._count = 0  # messages this process wrote or read so far

    @classmethod
    def create(cls, readers: int, slots: int = 4, slot_bytes: int = 1 << 20) -> ShmBroadcast:
        size = 16 * slots + 8 * readers + slots * slot_bytes
        shm = shared_memory.SharedMemory(create=True, size=size)
        shm.buf[: 16 * slots + 8 * readers] = bytes(16 * slots + 8 * readers)
        return cls(shm, readers, slots, slot_bytes, None)

    @classmethod
    def attach(cls, spec: str, reader: int) -> ShmBroadcast:
        """A follower's end, from the writer's `spec` (`name:readers:slots:slot_bytes`)."""
        name, readers, slots, slot_bytes = spec.rsplit(":", 3)
        shm = shared_memory.SharedMemory(name=name)
        # Python < 3.13 registers an attached block for unlinking at exit: the writer owns it.
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, int(readers), int(slots), int(slot_bytes), reader)

    @property
    def spec(self) -> str:
        return f"{self.shm.name}:{self.readers}:{self.slots}:{self.slot_bytes}"

    def write(self, obj, spill, timeout_s: float) -> None:
        """Writer: publish `obj`; `spill(obj)` sends one that does not fit a slot another way."""
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        k = self._count + 1
        slot = k % self.slots
        if k > self.slots:  # the slot's previous message must have been read by everyone
            oldest = np.uint64(k - self.slots)
            _wait(lambda: bool((self._read >= oldest).all()), timeout_s, "a follower to read")
        fits = len(data) <= self.slot_bytes
        if fits:
            start = self._data + slot * self.slot_bytes
            self.shm.buf[start : start + len(data)] = data
        self._len[slot] = np.uint64(len(data)) if fits else SPILLED
        self._seq[slot] = np.uint64(k)
        self._count = k
        if not fits:
            spill(obj)

    def read(self, unspill, timeout_s: float | None = None):
        """Follower: the next message; `unspill()` receives one that did not fit a slot."""
        k = self._count + 1
        slot = k % self.slots
        _wait(lambda: int(self._seq[slot]) == k, timeout_s, "rank 0's next message")
        size = self._len[slot]
        if size == SPILLED:
            obj = None
        else:
            start = self._data + slot * self.slot_bytes
            obj = pickle.loads(bytes(self.shm.buf[start : start + int(size)]))
        self._count = k
        self._read[self.reader] = np.uint64(k)
        return unspill() if size == SPILLED else obj

    def close(self) -> None:
        self._seq = self._len = self._read = None  # views into the block go before it closes
        self.shm.close()
        if self.reader is None:
            self.shm.unlink()


def _wait(ready, timeout_s: float | None, what: str) -> None:
    """Spin briefly (a decode step's message is usually a few µs away), then yield, then
    sleep in short naps (an idle server's followers)."""
    if ready():
        return
    start = time.perf_counter()
    spins = 0
    while not ready():
        spins += 1
        if spins > 200:
            waited = time.perf_counter() - start
            if timeout_s is not None and waited > timeout_s:
                raise TimeoutError(f"waited {waited:.0f} s for {what}")
            time.sleep(0 if waited < 0.005 else 0.0005)
