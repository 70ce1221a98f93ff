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

Staging goes through numpy where the dtype has a numpy twin: the ring's slot is a numpy view of
the pinned buffer, filled by a numpy assignment and handed to the copy by `torch.from_numpy`
(about 4 µs of host time on the 2-core development CPU, against 13 µs for a torch slice, two
views and a `copy_`: session 17). The copy's host address still lies inside the pinned
allocation, which is what makes `cudaMemcpyAsync` asynchronous; numpy arrays are accepted as
sources, so callers holding one (the runner, the attention backend) skip `torch.from_numpy`.

Each upload notes the stream its copy went to (the segment's event is recorded there). On CUDA
it asks for the current stream's raw handle, an integer (`torch._C._cuda_getCurrentRawStream`),
and builds the `torch.cuda.Stream` only for a handle the segment has not met: building one on
every upload (`torch.cuda.current_stream`) took 4.9 µs of host time on the H200's host (session
18, `scripts/host_primitives.py`), several times a step.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import numpy as np
import torch

RING_BYTES = 16 << 20
RING_SEGMENTS = 16
_ALIGN = 64
#: torch dtypes staged through numpy (the others, bfloat16 say, through torch views)
_NUMPY_DTYPES = {
    torch.float64: np.float64,
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


class PinnedRing:
    """Pinned staging memory reused for small host-to-device copies (see the module docstring).

    `events`: a factory of objects with `record(stream)` and `synchronize()` (CUDA events;
    tests pass stand-ins), `stream`: the function giving the stream a copy is queued on (a
    stand-in is its own key; on CUDA the raw stream handle is the key, see the module
    docstring)."""

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
        self._bytes = self.buffer.numpy()  # the same memory, for numpy staging
        self.segment_bytes = nbytes // segments
        self.segments = segments
        self.offset = 0  # the next free byte
        self.segment = 0  # the segment it lies in
        self.left: list[list] = [[] for _ in range(segments)]  # events recorded on leaving
        self.streams: dict = {}  # the streams the current segment's copies went to, by key
        self._event = events or torch.cuda.Event
        if stream is None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            raw = torch._C._cuda_getCurrentRawStream
            self._stream_key = lambda: raw(index)
            self._stream = lambda: torch.cuda.current_stream(device)
        else:
            self._stream_key = self._stream = stream
        self._lock = threading.Lock()
        self.waits = 0  # times a segment's old copies were waited for (tests, diagnostics)

    def upload(self, src: torch.Tensor | np.ndarray, dst: torch.Tensor) -> torch.Tensor | None:
        """Copy `src` (a contiguous CPU tensor, or a numpy array) into `dst` through the ring,
        asynchronously; None when `src` is larger than a segment."""
        if isinstance(src, torch.Tensor) and src.dtype in _NUMPY_DTYPES and not src.requires_grad:
            src = src.numpy()
        nbytes = src.nbytes if isinstance(src, np.ndarray) else src.numel() * src.element_size()
        if nbytes > self.segment_bytes:
            return None
        with self._lock:  # the copy is queued inside: an event recorded later covers it
            start = self._claim(nbytes)
            if isinstance(src, np.ndarray):
                staged = self._bytes[start : start + nbytes].view(src.dtype).reshape(src.shape)
                staged[...] = src
                staged = torch.from_numpy(staged)
            else:  # no numpy twin (bfloat16): torch views of the buffer
                staged = self.buffer[start : start + nbytes].view(src.dtype).view(src.shape)
                staged.copy_(src)
            dst.copy_(staged, non_blocking=True)
            key = self._stream_key()
            if key not in self.streams:
                self.streams[key] = self._stream()
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
        for stream in self.streams.values():
            event = self._event()
            event.record(stream)
            events.append(event)
        self.left[segment] = events
        self.streams = {}


_rings: dict[int, PinnedRing] = {}


def _ring(device: torch.device) -> PinnedRing:
    index = device.index if device.index is not None else torch.cuda.current_device()
    ring = _rings.get(index)
    if ring is None:
        ring = _rings[index] = PinnedRing(torch.device("cuda", index))
    return ring


def upload(src: torch.Tensor | np.ndarray, dst: torch.Tensor) -> torch.Tensor:
    """Copy the CPU tensor or numpy array `src` into the device tensor `dst` (same shape; a
    dtype `copy_` converts) without making the host wait: through the pinned ring on CUDA, a
    plain copy elsewhere."""
    if isinstance(src, np.ndarray):
        src = np.ascontiguousarray(src)
        if not dst.is_cuda or src.dtype not in _TORCH_DTYPES:
            src = torch.from_numpy(src)
    else:
        src = src.contiguous()
    if not dst.is_cuda:
        return dst.copy_(src)
    if torch.cuda.is_current_stream_capturing() or _ring(dst.device).upload(src, dst) is None:
        host = torch.from_numpy(src) if isinstance(src, np.ndarray) else src
        dst.copy_(host.pin_memory(), non_blocking=True)
    return dst


def to_device(
    values: Sequence | torch.Tensor | np.ndarray,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """`values` (a list, nested lists, a CPU tensor or a numpy array) as a tensor on `device`;
    on CUDA via pinned memory and an asynchronous copy, elsewhere a plain conversion."""
    if device.type == "cuda":
        array = _as_array(values, dtype)
        if array is not None:
            empty = torch.empty(array.shape, dtype=_TORCH_DTYPES[array.dtype], device=device)
            return upload(array, empty)
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return upload(tensor, torch.empty(tensor.shape, dtype=tensor.dtype, device=device))


_TORCH_DTYPES = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}


def _as_array(values, dtype: torch.dtype | None) -> np.ndarray | None:
    """`values` as the numpy array `torch.as_tensor(values, dtype=dtype)` would hold, where
    numpy gives the same (a numpy array; a list with a dtype numpy has); else None. (A list
    without a dtype is left to torch: it infers float32 where numpy infers float64.)"""
    if isinstance(values, np.ndarray):
        target = values.dtype if dtype is None else _NUMPY_DTYPES.get(dtype)
    elif isinstance(values, (list, tuple)) and dtype is not None:
        target = _NUMPY_DTYPES.get(dtype)
    else:
        return None
    if target is None or np.dtype(target) not in _TORCH_DTYPES:
        return None
    return np.asarray(values, dtype=target)
