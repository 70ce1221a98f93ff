"""Moving small host values to the device without stalling the step loop.

A copy from ordinary (pageable) host memory to a CUDA device first waits for the stream to
finish everything queued before it — with overlap scheduling, the forward pass the engine has
just launched — so the host stops until the GPU is idle. Going through pinned memory queues the
copy behind that work instead and returns at once. Plugins that build per-step tensors from
Python values (sampling parameters, index lists) should use `to_device`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(
    values: Sequence | torch.Tensor, device: torch.device, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """`values` (a list, nested lists, or a CPU tensor) as a tensor on `device`; on CUDA via
    pinned memory and an asynchronous copy, elsewhere a plain conversion."""
    tensor = torch.as_tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)
