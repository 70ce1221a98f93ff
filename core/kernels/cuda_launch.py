"""Launching an NVRTC-compiled kernel (`torch.cuda._compile_kernel`) with programmatic dependent
launch (PDL): `cuLaunchKernelEx` through ctypes with the launch attribute
`CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION`, on the current stream (CUDA-graph
capturable: the graph gets a programmatic edge). torch's own launcher (`cuLaunchKernel`) takes
no attributes. The kernel must order its reads of earlier kernels' outputs and its stores
after `griddepcontrol.wait` (see `pdl.py` for pegboard's Triton kernels).

The structures follow cuda.h (CUDA 12-13; tests/test_w4a16_marlin.py checks sizes and offsets
against the installed header).
"""

from __future__ import annotations

import ctypes
import functools

import torch

#: CUlaunchAttributeID CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
PROGRAMMATIC_STREAM_SERIALIZATION = 6


class LaunchAttributeValue(ctypes.Union):
    """CUlaunchAttributeValue: a 64-byte union (8-byte aligned: some members hold pointers)."""

    _fields_ = [("pad", ctypes.c_char * 64), ("flag", ctypes.c_int), ("align", ctypes.c_uint64)]


class LaunchAttribute(ctypes.Structure):
    """CUlaunchAttribute: the id, padding to 8 bytes, the value."""

    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", LaunchAttributeValue)]


class LaunchConfig(ctypes.Structure):
    """CUlaunchConfig."""

    _fields_ = [
        ("gridDimX", ctypes.c_uint),
        ("gridDimY", ctypes.c_uint),
        ("gridDimZ", ctypes.c_uint),
        ("blockDimX", ctypes.c_uint),
        ("blockDimY", ctypes.c_uint),
        ("blockDimZ", ctypes.c_uint),
        ("sharedMemBytes", ctypes.c_uint),
        ("hStream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(LaunchAttribute)),
        ("numAttrs", ctypes.c_uint),
    ]


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuLaunchKernelEx.argtypes = [
        ctypes.POINTER(LaunchConfig),
        ctypes.c_void_p,  # CUfunction
        ctypes.POINTER(ctypes.c_void_p),  # kernelParams
        ctypes.c_void_p,  # extra
    ]
    lib.cuLaunchKernelEx.restype = ctypes.c_int
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    lib.cuGetErrorString.restype = ctypes.c_int
    return lib


def _argument(value: torch.Tensor | int) -> ctypes.c_void_p | ctypes.c_int:
    """A kernel parameter as the kernel declares it: a pointer per tensor, a 32-bit int."""
    if isinstance(value, torch.Tensor):
        return ctypes.c_void_p(value.data_ptr())
    if isinstance(value, int):
        return ctypes.c_int(value)
    raise TypeError(f"kernel arguments are tensors and ints, not {type(value).__name__}")


def launch_pdl(
    kernel,
    grid: tuple[int, int, int],
    block: tuple[int, int, int],
    args: list[torch.Tensor | int],
) -> None:
    """Launch `kernel` (a `torch.cuda._compile_kernel` result: its `func` is the CUfunction) on
    the current stream with programmatic stream serialization allowed."""
    values = [_argument(a) for a in args]  # kept alive until the call returns
    params = (ctypes.c_void_p * len(values))(*[ctypes.addressof(v) for v in values])
    attribute = LaunchAttribute(id=PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value.flag = 1
    config = LaunchConfig(*grid, *block, 0, torch.cuda.current_stream().cuda_stream)
    config.attrs = ctypes.pointer(attribute)
    config.numAttrs = 1
    driver = _driver()
    result = driver.cuLaunchKernelEx(ctypes.byref(config), kernel.func, params, None)
    if result != 0:
        message = ctypes.c_char_p()
        driver.cuGetErrorString(result, ctypes.byref(message))
        text = message.value.decode() if message.value else "unknown error"
        raise RuntimeError(f"cuLaunchKernelEx: CUDA error {result}: {text}")
