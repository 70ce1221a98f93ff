"""`TensorParallel`: what the engine and the model runner of every rank hold.

Rank 0 (the leader) runs the scheduler and every plugin hook; the model runner tells the
followers what to compute through this object: the step's batch layout over the plan group
(host lists: query and sequence lengths, page tables) and its token ids, positions, KV slots
and logits rows as one device broadcast (so ids still on the device under overlap scheduling
never make rank 0 wait), rebinds of the attention backend and KV pool after a swap, the
profile run, expert placements (expert parallelism: every rank moves its experts), and stop.
Followers (`pegboard.core.distributed.follower`) replay each message on their own runner, so
every rank runs the same collectives in the same order.
"""

from __future__ import annotations

import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from pegboard.core.distributed.group import Groups
from pegboard.core.distributed.launch import Children, fatal
from pegboard.core.distributed.sharding import ModelShard
from pegboard.core.distributed.shm_broadcast import ShmBroadcast
from pegboard.core.distributed.topology import (
    DistributedConfigError,
    Topology,
    check_divisible,
    topology,
)
from pegboard.sdk.types import ForwardBatch, KVPool

log = logging.getLogger("pegboard.distributed")


class TensorParallel:
    """This rank's membership of the tensor-parallel group (see the module docstring)."""

    def __init__(self, top: Topology, groups: Groups, children: Children | None) -> None:
        self.top = top
        self.groups = groups
        self.children = children
        self.device = str(groups.device)
        self._last_pool: weakref.ref[KVPool] | None = None
        #: Expert parallelism (`--ep-size`, the group's size): redundant expert slots per
        #: sparse layer; None: no expert parallelism.
        self.ep_redundant: int | None = None

    @property
    def rank(self) -> int:
        return self.top.rank

    @property
    def size(self) -> int:
        return self.top.world_size

    @property
    def is_leader(self) -> bool:
        return self.top.is_leader

    def shard(self, cfg) -> ModelShard:
        """This rank's part of a model with `ModelConfig` `cfg` (the loader builds it)."""
        return ModelShard(cfg, self.rank, self.size, self.groups, self.ep_redundant)

    # ------------------------------------------------------------ rank 0 -> followers

    def share_batch(self, batch: ForwardBatch) -> None:
        """Leader: send the followers this step's batch (a follower: nothing to do)."""
        if not self.is_leader:
            return
        rows = batch.logits_rows  # speculative decoding: the rows whose logits are verified
        num_rows = -1 if rows is None else len(rows)
        meta = (batch.query_lens_cpu, batch.seq_lens_cpu, batch.page_tables_cpu, batch.samples)
        self._send("forward", (*meta, num_rows))
        parts = [batch.input_ids, batch.positions, batch.slot_mapping, batch.logits_indices]
        self._guard(
            self.groups.broadcast_tensor, torch.cat(parts + ([] if rows is None else [rows]))
        )

    def share_profile(self, max_tokens: int, max_requests: int) -> None:
        """Leader: make the followers run the same profile forward (it all-reduces)."""
        if self.is_leader:
            self._send("profile", (max_tokens, max_requests))

    def share_placement(self, physical_to_logical: torch.Tensor) -> None:
        """Leader: the followers apply the same expert placement `[layers, slots]` (the
        weights move between the ranks, every rank taking part)."""
        if self.is_leader:
            self._send("placement", physical_to_logical.cpu().tolist())

    def bind(self, attention: Any, pool: KVPool, engine: dict) -> None:
        """Leader: the followers build their attention backend from the same plugin and
        options over a pool of the same pages (kept when rank 0 kept its pool)."""
        if not self.is_leader:
            return
        layout = (len(pool.k), tuple(pool.k[0].shape), str(pool.k[0].dtype), pool.page_size)
        layout += (list(pool.k_scales), list(pool.v_scales))  # an FP8 pool's per-layer scales
        layout += (pool.v_layout,)  # how values are stored (`--kv-cache-layout`)
        kept = self._last_pool is not None and self._last_pool() is pool
        self._last_pool = weakref.ref(pool)  # not keeping a swapped-out pool's memory alive
        options = attention.options.model_dump()
        self._send("bind", (attention.name, options, layout, kept, engine))

    def close(self) -> None:
        """Leader: stop the followers; every rank then leaves the group at the same time (NCCL's
        teardown waits for its peers: a leader that first waited for its children to exit, while
        they waited in the teardown for it, hung until it killed them, then hung alone)."""
        if self.children is not None:
            self.children.expect_exit()  # the followers exit once the group is torn down
        if self.is_leader:
            self._send("stop", None)
        self.groups.destroy()
        if self.children is not None:
            self.children.close()

    def _send(self, kind: str, payload: Any) -> None:
        self._guard(self.groups.broadcast_objects, [(kind, payload)])

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except Exception as e:
            children = list(self.children.procs.values()) if self.children else []
            fatal(
                f"tensor-parallel rank {self.rank}: a collective failed ({e}); a rank is gone",
                children,
            )

    # ------------------------------------------------------------ followers

    def receive(self) -> tuple[str, Any]:
        """Follower: the leader's next message (blocks while the server is idle)."""
        return self._guard(self.groups.broadcast_objects, [None])[0]

    def receive_batch(self, meta) -> ForwardBatch:
        """Follower: the batch of a "forward" message, its tensors from the device broadcast."""
        query_lens, seq_lens, page_tables, samples, num_rows = meta
        t, n = sum(query_lens), len(query_lens)
        size = 3 * t + n + max(num_rows, 0)
        flat = torch.empty(size, dtype=torch.int64, device=self.groups.device)
        self._guard(self.groups.broadcast_tensor, flat)
        return ForwardBatch(
            requests=[None] * n,
            input_ids=flat[:t],
            positions=flat[t : 2 * t],
            slot_mapping=flat[2 * t : 3 * t],
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            page_tables_cpu=page_tables,
            logits_indices=flat[3 * t : 3 * t + n],
            samples=samples,
            logits_rows=None if num_rows < 0 else flat[3 * t + n :],
        )


#: Plugins that copy KV pages themselves, on rank 0's pool only (issue 11: not under TP yet).
UNSUPPORTED = {"kv_cache": ("hicache",)}


def start_tensor_parallel(config) -> TensorParallel | None:
    """Rank 0 of a group: check the settings, spawn this node's other ranks, join the group and
    hand the followers the engine config. None for a single-rank engine. Raises
    `DistributedConfigError` (before starting anything) for settings that cannot work."""
    top = check_tensor_parallel(config)
    if top is None:
        return None
    if not top.is_leader:
        raise ValueError(f"this process is rank {top.rank}; only rank 0 runs an engine")
    plan_shm = plan_channel(top)
    children = Children(
        top, config.device, config.dist_timeout, plan_shm.spec if plan_shm else None
    )
    try:
        device = torch.device(top.device(config.device))
        groups = Groups(top, device, config.dist_timeout, plan_shm)
    except Exception as e:
        fatal(
            f"joining the tensor-parallel group at {top.init_addr} failed: {e}",
            list(children.procs.values()),
        )
    tp = TensorParallel(top, groups, children)
    tp.ep_redundant = config.ep_num_redundant_experts if config.ep_size > 1 else None
    tp._send("config", config.model_dump())
    log.info("tensor parallel: rank 0 of %d (%s)", top.world_size, groups.device)
    return tp


def plan_channel(top: Topology) -> ShmBroadcast | None:
    """Rank 0's shared-memory channel to the followers it spawns, when they all run on its node
    (not under torchrun, not multi-node, not with `PEGBOARD_TP_PLAN=gloo`)."""
    if top.nnodes != 1 or top.torchrun or not top.spawns:
        return None
    if os.environ.get("PEGBOARD_TP_PLAN", "shm") == "gloo":
        return None
    return ShmBroadcast.create(readers=len(top.spawns))


def check_tensor_parallel(config) -> Topology | None:
    """This process's topology, checked against the devices and the model's shape; None for
    a single-rank engine. Raises `DistributedConfigError` (or `MoEFlagError` for MoE settings,
    as the CLI's preflight does before)."""
    from pegboard.core.default_model import default_model_dir
    from pegboard.core.models.config import ModelConfig
    from pegboard.core.models.errors import ModelLoadError
    from pegboard.core.models.quantization import detect_quantization
    from pegboard.core.moe.flags import check_moe

    if config.tp_size == 1 and config.nnodes == 1:
        return None
    top = topology(
        config.tp_size, config.nnodes, config.node_rank, config.dist_init_addr, config.device
    )
    for slot, name in (("kv_cache", config.kv_cache), ("transfer", config.transfer)):
        if name in UNSUPPORTED.get(slot, ()) or (slot == "transfer" and name):
            raise DistributedConfigError(
                f"--{slot.replace('_', '-')} {name} is not supported with --tp-size > 1 yet: "
                "it moves KV pages of rank 0's pool only"
            )
    if top.is_leader:
        try:
            model_dir = Path(config.model) if config.model else default_model_dir()
            cfg = ModelConfig.from_dir(model_dir)
            quantized = detect_quantization(model_dir, config.quantization, config.load_format)
        except ModelLoadError:
            return top  # the model loader reports it, as without tensor parallelism
        check_moe(config, cfg)  # before any rank starts: MoE needs --ep-size, experts divide
        check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, top.world_size)
        if quantized is not None:
            raise DistributedConfigError(
                f"{model_dir} is a quantized checkpoint; its layers cannot be split over "
                "tensor-parallel ranks yet: serve it with --tp-size 1"
            )
    return top
