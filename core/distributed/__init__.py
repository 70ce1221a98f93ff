"""Tensor parallelism on `torch.distributed` (NCCL on CUDA, gloo on the CPU) and multi-node
launch: topology, process groups, the sharded model, rank 0's plan broadcast and the
followers' replay loop. See docs/architecture.md, "Tensor parallelism"."""

from pegboard.core.distributed.tensor_parallel import (
    TensorParallel,
    check_tensor_parallel,
    start_tensor_parallel,
)
from pegboard.core.distributed.topology import DistributedConfigError

__all__ = [
    "DistributedConfigError",
    "TensorParallel",
    "check_tensor_parallel",
    "start_tensor_parallel",
]
