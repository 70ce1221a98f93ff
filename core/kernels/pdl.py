"""Programmatic dependent launch (PDL, Hopper and newer): a kernel starts while the kernel
before it in the stream is still running, and waits for it only where it reads its outputs.

At batch 1 a decode step is a chain of short kernels, each paying its launch and the latency
of its first loads. With PDL the next kernel's programs are already resident when the current
one finishes: a GEMV has its first weight tile in flight (weights depend on no earlier
kernel), a norm or rope program is ready to load its row. Each kernel here calls
`wait_for_inputs` before it reads anything an earlier kernel writes and before any store; the
wait returns once the kernel before has completed and its writes are visible (so, in turn,
every kernel before that one). Kernels that do not use PDL (cuBLAS, attention) launch as
usual and are waited for as usual. CUDA graphs capture the dependency as a programmatic edge.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.cuda_support import pdl_enabled
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait


def launch_options(device: torch.device) -> dict[str, bool]:
    """Keyword arguments for launching a kernel that calls `wait_for_inputs(PDL)`."""
    if pdl_enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """With PDL: wait until the kernel before has completed (its writes visible), then let the
    kernel after this one launch. Before this call a kernel may read only what no earlier kernel
    writes (weights) and may store nothing."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
