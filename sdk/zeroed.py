"""Large zeroed host tensors without a memset: fresh anonymous pages read as zero.

`torch.zeros` on the CPU writes every byte up front. The CPU KV pool is 512 MiB by default
(`cpu_kv_cache_bytes`), so each engine start paid a half-GiB memset (about a second on a busy
2-core machine) for pages most runs never touch. Memory from an anonymous `mmap` is zeroed by
the kernel page by page, the first time each page is touched, so the pool costs only what is
used. Elsewhere (CUDA) and for small sizes this is plain `torch.zeros`.
"""

from __future__ import annotations

import math
import mmap

import torch

#: Below this many bytes `torch.zeros` is as cheap (and keeps small tensors off their own maps).
LAZY_MIN_BYTES = 1 << 20


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """A contiguous zeroed tensor; on the CPU, large ones from lazily zeroed anonymous pages."""
    device = torch.device(device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if device.type != "cpu" or nbytes < LAZY_MIN_BYTES:
        return torch.zeros(shape, dtype=dtype, device=device)
    # Private (copy-on-write in a forked child, as malloc'd memory); the tensor holds a
    # reference to the map, which is unmapped when the tensor is freed.
    pages = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    return torch.frombuffer(pages, dtype=torch.uint8).view(dtype).view(shape)
