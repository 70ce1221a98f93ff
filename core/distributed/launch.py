"""Starting the ranks of a node and ending the whole group when one of them dies.

The process `pegboard serve` (or `LLM`) starts is rank 0; it spawns the other ranks of its node
as child processes (`python -m pegboard.core.distributed.follower`). A monitor thread waits on
each child: a child that exits while the group is running ends this process at once with a
message naming the rank (a tensor-parallel group that lost a rank cannot compute another
step). A child watches its parent the same way and exits when it is gone.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

from pegboard.core.distributed.topology import Topology

log = logging.getLogger("pegboard.distributed")

#: Exit status of a process whose tensor-parallel group lost a rank.
EXIT_RANK_LOST = 3


def fatal(message: str, children: list[subprocess.Popen] = ()) -> None:
    """Report `message`, stop the children, and end this process now (no clean-up can run:
    the other ranks may sit in a collective that will never complete)."""
    log.critical(message)
    print(f"pegboard: {message}", file=sys.stderr, flush=True)
    for child in children:
        if child.poll() is None:
            child.kill()
    os._exit(EXIT_RANK_LOST)


class Children:
    """The ranks this process spawned, watched until `close`."""

    def __init__(
        self, top: Topology, device: str, timeout_s: float, plan_shm: str | None = None
    ) -> None:
        self.procs: dict[int, subprocess.Popen] = {}
        self.closing = False
        for rank in top.spawns:
            child = top.for_rank(rank)
            argv = [
                sys.executable,
                "-m",
                "pegboard.core.distributed.follower",
                f"--rank={rank}",
                f"--world-size={child.world_size}",
                f"--nnodes={child.nnodes}",
                f"--node-rank={child.node_rank}",
                f"--dist-init-addr={child.init_addr}",
                f"--device={device}",
                f"--dist-timeout={timeout_s}",
                f"--parent-pid={os.getpid()}",
            ] + ([f"--plan-shm={plan_shm}"] if plan_shm else [])
            self.procs[rank] = subprocess.Popen(argv)
        for rank, proc in self.procs.items():
            threading.Thread(
                target=self._watch, args=(rank, proc), name=f"tp-rank-{rank}", daemon=True
            ).start()

    def _watch(self, rank: int, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if not self.closing:
            fatal(
                f"tensor-parallel rank {rank} (pid {proc.pid}) exited with status {code}; "
                "the group cannot continue without it, ending this process",
                list(self.procs.values()),
            )

    def expect_exit(self) -> None:
        """From now on a child that exits is ending, not lost (the group is being stopped)."""
        self.closing = True

    def close(self, timeout_s: float = 30.0) -> None:
        """Wait for the children to exit after a stop message; kill any that do not."""
        self.closing = True
        deadline = time.monotonic() + timeout_s
        for proc in self.procs.values():
            try:
                proc.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def watch_parent(parent_pid: int) -> None:
    """Exit when the parent process is gone (a rank 0 that crashed or was killed)."""

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(0.5)
        fatal(f"the parent process (pid {parent_pid}, a lower rank) is gone; ending this rank")

    threading.Thread(target=watch, name="tp-parent", daemon=True).start()
