"""Moving small host values to the device without stalling the step loop.

A copy from ordinary (pageable) host memory to a CUDA device first waits for the stream to
finish everything queued before it — with overlap scheduling, the forward pass the engine has
just launched — so the host stops until the GPU is idle. Going through pinned memory queues the
copy behind that work instead and returns at once. Plugins that build per-step tensors from
Python values (sampling parameters, index lists) should use `to_device` (or `upload` into a
tensor they keep).

Where the pinned memory comes from: `tensor.pin_memory()` asks PyTorch's caching host
allocator for a block on every call (about 50 µs of host time each on the H200's host,
2026-11-30 profile, and a step makes several). Instead, small uploads are staged in one pinned
ring per device (`PinnedRing`): a bump pointer over a 16 MiB buffer cut into 16 segments; a
CUDA event recorded when the pointer leaves a segment marks when that segment's copies have
run, and the pointer waits for it before writing there again, one lap (16 MiB of uploads,
hundreds of steps) later. During CUDA graph capture, or for an upload larger than a segment,
the old way (`pin_memory()`) is used: a captured copy reads its host address at every replay,
so it must not point into memory the ring will reuse.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

RING_BYTES = 16 << 20
RING_SEGMENTS = 16
_ALIGN = 64


class PinnedRing:
    """Pinned staging memory reused for small host-to-device copies (see the module docstring).

    `events`: a factory of objects with `record(stream)` and `synchronize()` (CUDA events;
    tests pass stand-ins), `stream`: the function giving the stream a copy is queued on."""

    def __init__(
        self,
        device: torch.device,
        nbytes: int = RING_BYTES,
        segments: int = RING_SEGMENTS,
        pinned: bool = True,
        events: Callable[[], object] | None = None,
        stream: Callable[[], object] | None = None,
    ) -> None:
        self.buffer = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pinned)
        self.segment_bytes = nbytes // segments
        self.segments = segments
        self.offset = 0  # the next free byte
        self.segment = 0  # the segment it lies in
        self.left: list[list] = [[] for _ in range(segments)]  # events recorded on leaving
        self.streams: set = set()  # streams the current segment's copies went to
        self._event = events or torch.cuda.Event
        self._stream = stream or (lambda: torch.cuda.current_stream(device))
        self._lock = threading.Lock()
        self.waits = 0  # times a segment's old copies were waited for (tests, diagnostics)

    def upload(self, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor | None:
        """Copy the contiguous CPU tensor `src` into `dst` through the ring, asynchronously;
        None when `src` is larger than a segment."""
        nbytes = src.numel() * src.element_size()
        if nbytes > self.segment_bytes:
            return None
        with self._lock:  # the copy is queued inside: an event recorded later covers it
            start = self._claim(nbytes)
            staged = self.buffer[start : start + nbytes].view(src.dtype).view(src.shape)
            staged.copy_(src)
            dst.copy_(staged, non_blocking=True)
            self.streams.add(self._stream())
        return dst

    def _claim(self, nbytes: int) -> int:
        """The start of `nbytes` free bytes inside one segment, moving to the next segment
        (and waiting for its copies of the last lap) when the current one is full."""
        start = -(-self.offset // _ALIGN) * _ALIGN
        if start + nbytes > (self.segment + 1) * self.segment_bytes:
            self._leave(self.segment)
            self.segment = (self.segment + 1) % self.segments
            start = self.segment * self.segment_bytes
            for event in self.left[self.segment]:
                event.synchronize()
                self.waits += 1
            self.left[self.segment] = []
        self.offset = start + nbytes
        return start

    def _leave(self, segment: int) -> None:
        events = []
        for stream in self.streams:
            event = self._event()
            event.record(stream)
            events.append(event)
        self.left[segment] = events
        self.streams = set()


_rings: dict[int, PinnedRing] = {}


def _ring(device: torch.device) -> PinnedRing:
    index = device.index if device.index is not None else torch.cuda.current_device()
    ring = _rings.get(index)
    if ring is None:
        ring = _rings[index] = PinnedRing(torch.device("cuda", index))
    return ring


def upload(src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
    """Copy the CPU tensor `src` into the device tensor `dst` (same shape and dtype) without
    making the host wait: through the pinned ring on CUDA, a plain copy elsewhere."""
    if not dst.is_cuda:
        return dst.copy_(src)
    src = src.contiguous()
    if torch.cuda.is_current_stream_capturing() or _ring(dst.device).upload(src, dst) is None:
        dst.copy_(src.pin_memory(), non_blocking=True)
    return dst


def to_device(
    values: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`values` (a list, nested lists, or a CPU tensor) as a tensor on `device`; on CUDA via
    pinned memory and an asynchronous copy, elsewhere a plain conversion."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return upload(tensor, torch.empty(tensor.shape, dtype=tensor.dtype, device=device))
