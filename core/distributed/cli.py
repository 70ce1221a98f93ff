"""`pegboard serve` under tensor parallelism: check the settings before anything starts, and
run this process as a follower when it is not rank 0 (`--node-rank N > 0`, or a torchrun rank
other than 0)."""

from __future__ import annotations

import sys

from pegboard.core.distributed.follower import run_follower
from pegboard.core.distributed.tensor_parallel import check_tensor_parallel
from pegboard.core.distributed.topology import DistributedConfigError


def serve_follower(config) -> int | None:
    """None when this process serves HTTP (one rank, or rank 0); otherwise serve as a
    follower rank until rank 0 stops and return the exit status (2 for bad settings)."""
    try:
        top = check_tensor_parallel(config)
    except DistributedConfigError as e:
        print(f"pegboard serve: {e}", file=sys.stderr)
        return 2
    if top is None or top.is_leader:
        return None
    return run_follower(top, config.device, config.dist_timeout)
