"""Whether a bf16 CUDA kernel of pegboard's can run a model's layers on a device."""

from __future__ import annotations

import torch


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
