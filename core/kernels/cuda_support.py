"""Whether a CUDA kernel of pegboard's can run here, and launch with PDL. No Triton: the
modules that only ask (plugins at import, the CLI before the model loads) stay light."""

from __future__ import annotations

import functools
import os

import torch


def interpreting() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (`TRITON_INTERPRET` set, not "0"):
    no inline PTX there."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def bf16_sm80_reason(kernel: str, device: torch.device, dtype: torch.dtype) -> str | None:
    """Why `kernel` (its name in the message) cannot run here, or None: an NVIDIA GPU (not
    ROCm) of compute capability 8.0 or more (bf16 tensor cores) and bf16 activations."""
    if device.type != "cuda":
        return f"{kernel} runs on CUDA devices only"
    if dtype != torch.bfloat16:
        return f"{kernel} multiplies bf16 activations only, not {dtype}"
    if torch.version.hip is not None:
        return f"{kernel} runs on NVIDIA GPUs only"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 8:
        return f"{kernel} needs compute capability 8.0+, this GPU is {major}.{minor}"
    return None


@functools.cache
def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with programmatic dependent launch (`pdl.py`): a CUDA
    GPU of compute capability 9 or newer, unless `PEGBOARD_DISABLE_PDL` is set (not "0"), and
    never in the Triton interpreter."""
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") != "0":
        return False
    if os.environ.get("PEGBOARD_DISABLE_PDL", "0") not in ("", "0"):
        return False
    return torch.cuda.get_device_capability(device)[0] >= 9
