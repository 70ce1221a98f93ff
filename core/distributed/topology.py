"""Where this process sits in a tensor-parallel group: its rank, the group's size, the node it
runs on, how the group meets (`--dist-init-addr` or torchrun's environment) and its device.

Ranks are numbered node by node: node `n` runs global ranks `n * per_node ... (n + 1) *
per_node - 1`, and its local rank `i` uses GPU `i` (`cuda:i`, offset by an explicit `cuda:N`).
Launched by torchrun, `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `MASTER_ADDR` and `MASTER_PORT` say
all of it and no process is spawned.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch

#: torchrun's variables; all of them set means "launched by torchrun".
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedConfigError(ValueError):
    """A tensor-parallel setting that cannot work (the CLI exits 2 with this message)."""


@dataclass(frozen=True)
class Topology:
    """One process's place in the tensor-parallel group."""

    rank: int
    world_size: int
    local_rank: int
    nnodes: int
    node_rank: int
    init_addr: str  # HOST:PORT where rank 0 hosts the rendezvous store
    torchrun: bool = False

    @property
    def per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def is_leader(self) -> bool:
        """Rank 0: runs the scheduler, the plugins' hooks and the server."""
        return self.rank == 0

    @property
    def spawns(self) -> list[int]:
        """Global ranks this process starts as children: the rest of its node, unless
        torchrun started every rank already."""
        if self.torchrun or self.local_rank != 0:
            return []
        return list(range(self.rank + 1, self.rank + self.per_node))

    def for_rank(self, rank: int) -> Topology:
        """The topology of another rank on this node (a child this process spawns)."""
        return Topology(
            rank, self.world_size, rank % self.per_node, self.nnodes, self.node_rank, self.init_addr
        )

    def device(self, requested: str) -> str:
        """This rank's device for the engine's `--device`: the CPU stays the CPU, a CUDA device
        is shifted by the local rank (`auto`/`cuda` -> `cuda:<local rank>`)."""
        if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
            return "cpu"
        base = torch.device("cuda" if requested == "auto" else requested)
        if base.type != "cuda":
            return requested
        return f"cuda:{(base.index or 0) + self.local_rank}"


def topology(
    tp_size: int,
    nnodes: int = 1,
    node_rank: int = 0,
    dist_init_addr: str | None = None,
    device: str = "auto",
    env: dict[str, str] | None = None,
) -> Topology:
    """This process's topology from the flags, or from torchrun's environment when it is set
    (then `--tp-size` must equal `WORLD_SIZE`). Raises `DistributedConfigError`."""
    env = os.environ if env is None else env
    if tp_size < 1:
        raise DistributedConfigError(f"--tp-size must be at least 1, got {tp_size}")
    if all(v in env for v in TORCHRUN_VARS):
        world = int(env["WORLD_SIZE"])
        if world != tp_size:
            raise DistributedConfigError(
                f"torchrun started {world} processes (WORLD_SIZE) but --tp-size is {tp_size}; "
                "start one process per tensor-parallel rank"
            )
        local_world = int(env.get("LOCAL_WORLD_SIZE", world))
        top = Topology(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env["LOCAL_RANK"]),
            nnodes=world // local_world,
            node_rank=int(env["RANK"]) // local_world,
            init_addr=f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}",
            torchrun=True,
        )
    else:
        if nnodes < 1:
            raise DistributedConfigError(f"--nnodes must be at least 1, got {nnodes}")
        if not 0 <= node_rank < nnodes:
            raise DistributedConfigError(
                f"--node-rank {node_rank} is outside [0, {nnodes}) (--nnodes {nnodes})"
            )
        if tp_size % nnodes:
            raise DistributedConfigError(
                f"--tp-size {tp_size} cannot be split evenly over --nnodes {nnodes}"
            )
        if nnodes > 1 and not dist_init_addr:
            raise DistributedConfigError(
                "--nnodes > 1 needs --dist-init-addr HOST:PORT (rank 0's node, reachable by all)"
            )
        per_node = tp_size // nnodes
        top = Topology(
            rank=node_rank * per_node,
            world_size=tp_size,
            local_rank=0,
            nnodes=nnodes,
            node_rank=node_rank,
            init_addr=parse_init_addr(dist_init_addr) if dist_init_addr else free_address(),
        )
    check_devices(top, device)
    return top


def parse_init_addr(addr: str) -> str:
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise DistributedConfigError(f"--dist-init-addr must be HOST:PORT, got {addr!r}")
    return f"{host}:{port}"


def free_address(host: str = "127.0.0.1") -> str:
    """A loopback address with a port free right now (single-node groups rendezvous there)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def check_devices(top: Topology, device: str, flag: str = "--tp-size") -> None:
    """A CUDA group needs one GPU per rank of this node (`flag`: the flag that set the size)."""
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return
    if not device.startswith("cuda") and device != "auto":
        return
    if not torch.cuda.is_available():
        raise DistributedConfigError(f"--device {device} was requested but CUDA is not available")
    base = torch.device("cuda" if device == "auto" else device).index or 0
    count = torch.cuda.device_count()
    if base + top.per_node > count:
        raise DistributedConfigError(
            f"{flag} {top.world_size} over {top.nnodes} node(s) needs {top.per_node} GPU(s) "
            f"on this node from cuda:{base}, but only {count} are visible"
        )


def check_divisible(num_heads: int, num_kv_heads: int, intermediate: int, tp: int) -> None:
    """The model's shapes must split over `tp` ranks; raises `DistributedConfigError`."""
    if num_heads % tp:
        raise DistributedConfigError(
            f"--tp-size {tp} does not divide the model's {num_heads} attention heads"
        )
    if num_kv_heads >= tp and num_kv_heads % tp:
        raise DistributedConfigError(
            f"--tp-size {tp} does not divide the model's {num_kv_heads} KV heads"
        )
    if num_kv_heads < tp and tp % num_kv_heads:
        raise DistributedConfigError(
            f"the model's {num_kv_heads} KV heads cannot be replicated evenly over --tp-size {tp}"
        )
    if intermediate % tp:
        raise DistributedConfigError(
            f"--tp-size {tp} does not divide the model's intermediate size {intermediate}"
        )
