"""Helpers the kernel launchers share: argument normalisation and device facts."""

from __future__ import annotations

import functools

import torch


def unit_last_dim(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its last dimension is contiguous, else a contiguous copy: the kernels
    take every stride but the last as an argument and index the last with stride 1."""
    return x if x.stride(-1) == 1 else x.contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """`tl.dot`'s input precision: exact `"ieee"` for float32 inputs (Triton would otherwise
    round them to TF32 on the GPU), the tensor cores' native one for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU interpreter."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
