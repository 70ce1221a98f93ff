"""The tensor-parallel process groups, on `torch.distributed`.

Two groups over the same ranks:
- the device group (the default group: NCCL on CUDA, gloo on the CPU) carries the model's
  all-reduces and all-gathers, with a timeout (`--dist-timeout`) so a lost rank fails a step
  instead of hanging it;
- the plan group (gloo, host memory) carries rank 0's messages to the followers (the step's
  batch layout, rebinds, stop) — on one node through shared memory instead
  (`pegboard.core.distributed.shm_broadcast`; `PEGBOARD_TP_PLAN=gloo` keeps gloo), with
  gloo only for messages too large for a slot. Followers wait on it while the server is idle,
  so it has no practical timeout; a dead peer closes its sockets (gloo) or is seen gone by
  the follower's parent watch (shared memory), which ends the wait.

On CUDA, batch-1 decode all-reduces are small and latency-bound: `symm_mem` (torch's
symmetric-memory one-shot all-reduce, where it runs) replaces NCCL for tensors up to
`SYMM_MEM_MAX_BYTES` unless `PEGBOARD_TP_ALLREDUCE=nccl`; there, the all-reduces of the
row-parallel projections are also fused with the RMSNorm after them at decode sizes
(`pegboard.core.distributed.fused_norm`, unless `PEGBOARD_TP_FUSED_NORM=0`).
"""

from __future__ import annotations

import datetime
import logging
import os
import threading

import torch
import torch.distributed as dist
from pegboard.core.distributed.fused_norm import FusedAllReduceNorm
from pegboard.core.distributed.shm_broadcast import ShmBroadcast
from pegboard.core.distributed.topology import Topology

log = logging.getLogger("pegboard.distributed")

#: The plan group's timeout: an idle server's followers wait this long for the next step.
PLAN_TIMEOUT = datetime.timedelta(days=365)
#: Largest all-reduce (bytes) the symmetric-memory path takes; larger ones go to NCCL.
SYMM_MEM_MAX_BYTES = 1 << 20
#: How long leaving the groups may take before a rank stops waiting for its peers.
DESTROY_TIMEOUT_S = 20.0


class Groups:
    """The initialised groups of this process and the collectives the model layers call."""

    def __init__(
        self,
        top: Topology,
        device: torch.device,
        timeout_s: float,
        plan_shm: ShmBroadcast | None = None,
    ) -> None:
        self.top = top
        self.device = device
        self.timeout_s = timeout_s
        self.plan_shm = plan_shm  # one node: the plan messages go through shared memory
        backend = "nccl" if device.type == "cuda" else "gloo"
        if top.init_addr.rpartition(":")[0] in ("127.0.0.1", "localhost"):
            # One host: gloo over loopback, whatever this machine's hostname resolves to.
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(
            backend,
            # torchrun's agent already hosts the store on MASTER_PORT: join it through env://
            init_method="env://" if top.torchrun else f"tcp://{top.init_addr}",
            rank=top.rank,
            world_size=top.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
            **({"device_id": device} if device.type == "cuda" else {}),
        )
        self.device_group = dist.group.WORLD
        self.plan_group = dist.new_group(backend="gloo", timeout=PLAN_TIMEOUT)
        # Rank 0's per-step batch tensors go over the device group, or with
        # PEGBOARD_TP_BATCH_GROUP=own over a communicator of their own: the A/B of whether an
        # eager broadcast waits behind the collectives the decode graphs captured on one.
        self.batch_group = self.device_group
        if device.type == "cuda" and os.environ.get("PEGBOARD_TP_BATCH_GROUP") == "own":
            self.batch_group = dist.new_group(backend="nccl")
        self._symm = _SymmetricAllReduce.create(device, self.device_group)
        self._fused: list[FusedAllReduceNorm] = []  # their buffers go before the group too

    @property
    def size(self) -> int:
        return self.top.world_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over the ranks (in place where it can)."""
        if self._symm is not None and self._symm.fits(x):
            return self._symm(x)
        dist.all_reduce(x, group=self.device_group)
        return x

    def fused_add_norm(self, hidden: int, dtype: torch.dtype) -> FusedAllReduceNorm | None:
        """The all-reduce fused with the RMSNorm after it (every rank calls this, at load):
        where the symmetric-memory all-reduce runs and the fused kernel passes its check."""
        if self._symm is None:
            return None
        fused = FusedAllReduceNorm.create(
            self.device_group, self.device, hidden, dtype, self.all_reduce
        )
        if fused is not None:
            self._fused.append(fused)
        return fused

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The ranks' `x` concatenated along the last dimension, in rank order."""
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.device_group)
        return torch.cat(parts, dim=-1)

    def exchange(
        self,
        sends: list[tuple[torch.Tensor, int, int]],
        receives: list[tuple[torch.Tensor, int, int]],
    ) -> None:
        """Point-to-point: send each `(tensor, rank, tag)` of `sends`, receive each `(tensor,
        rank, tag)` of `receives` into its (contiguous) tensor; a send and a receive pair by
        their tag (gloo) and by their order (NCCL), so every rank lists one plan's messages in
        the plan's order. A one-element all-reduce first: NCCL's point-to-point needs the
        group's communicator up on every rank."""
        dist.all_reduce(torch.zeros(1, device=self.device), group=self.device_group)
        ops = [dist.P2POp(dist.isend, t, peer, self.device_group, tag) for t, peer, tag in sends]
        ops += [
            dist.P2POp(dist.irecv, t, peer, self.device_group, tag) for t, peer, tag in receives
        ]
        for request in dist.batch_isend_irecv(ops) if ops else []:
            request.wait()

    def broadcast_objects(self, objects: list) -> list:
        """Rank 0's `objects` on every rank (a list of the same length everywhere)."""
        if self.plan_shm is None:
            dist.broadcast_object_list(objects, src=0, group=self.plan_group)
        elif self.top.is_leader:
            self.plan_shm.write(objects, self._plan_broadcast, self.timeout_s)
        else:
            objects[:] = self.plan_shm.read(lambda: self._plan_broadcast([None] * len(objects)))
        return objects

    def _plan_broadcast(self, objects: list) -> list:
        dist.broadcast_object_list(objects, src=0, group=self.plan_group)
        return objects

    def broadcast_tensor(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's device tensor `x` on every rank, queued on the stream (no host sync)."""
        dist.broadcast(x, src=0, group=self.batch_group)
        return x

    def destroy(self, timeout_s: float = DESTROY_TIMEOUT_S) -> None:
        """Leave the groups. Every rank calls this at about the same time (after rank 0's stop
        message); a teardown that still blocks past `timeout_s` (a peer already gone) is left
        behind with a warning rather than keeping the process from exiting."""
        if not dist.is_initialized():
            return
        self._symm = None  # the symmetric-memory buffers go before their group
        for fused in self._fused:
            fused.release()
        self._fused = []
        if self.plan_shm is not None:
            self.plan_shm.close()
            self.plan_shm = None
        teardown_fn = dist.destroy_process_group
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # every collective of this rank has completed
            # NCCL's destroy (finalize + destroy of each communicator) hung for 20 s on two H200s
            # even with both ranks calling it together; the group abort (all communicators in
            # one NCCL group call) frees the same resources without waiting on the peers.
            teardown_fn = getattr(dist.distributed_c10d, "_abort_process_group", teardown_fn)
        teardown = threading.Thread(target=teardown_fn, daemon=True)
        teardown.start()
        teardown.join(timeout_s)
        if teardown.is_alive():
            log.warning(
                "rank %d: leaving the tensor-parallel group took over %.0f s; not waiting longer",
                self.top.rank,
                timeout_s,
            )


class _SymmetricAllReduce:
    """torch's symmetric-memory one-shot all-reduce over a preallocated buffer: each rank
    reads its peers' buffers directly over NVLink, one kernel, no NCCL protocol."""

    def __init__(self, buffer: torch.Tensor, group_name: str) -> None:
        self.buffer = buffer
        self.group_name = group_name

    @classmethod
    def create(cls, device: torch.device, group) -> _SymmetricAllReduce | None:
        choice = os.environ.get("PEGBOARD_TP_ALLREDUCE", "auto")
        if device.type != "cuda" or choice == "nccl":
            return None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.9
                symm_mem.enable_symm_mem_for_group(group.group_name)
            buffer = symm_mem.empty(SYMM_MEM_MAX_BYTES, dtype=torch.uint8, device=device)
            symm_mem.rendezvous(buffer, group.group_name)
            reducer = cls(buffer, group.group_name)
            reducer.check(device, group)
            return reducer
        except Exception as e:  # not built in, no NVLink peers, ...
            if choice == "symm_mem":
                raise
            log.info("symmetric-memory all-reduce unavailable, using NCCL: %s", e)
            return None

    def check(self, device: torch.device, group) -> None:
        """One all-reduce against NCCL's, so a kernel that cannot run here fails at start."""
        x = (torch.arange(1024, device=device) % 64).to(torch.bfloat16) * (dist.get_rank() + 1)
        expected = x.clone()
        dist.all_reduce(expected, group=group)
        if not torch.equal(self(x), expected):
            raise RuntimeError("the symmetric-memory all-reduce disagrees with NCCL's")

    def fits(self, x: torch.Tensor) -> bool:
        return x.numel() * x.element_size() <= SYMM_MEM_MAX_BYTES

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        staged = self.buffer[: x.numel() * x.element_size()].view(x.dtype).view(x.shape)
        staged.copy_(x)
        return torch.ops.symm_mem.one_shot_all_reduce(staged, "sum", self.group_name)
