"""A follower rank (1 ... tp-1): loads its shard of the model, then replays rank 0's messages.

A follower runs no plugin hook but `attention_kernel` (each rank has its own attention backend
over its own KV pool of local heads) and no scheduler: rank 0 decides the batch, the page
tables and (expert parallelism) the expert placement, and the follower's model runner computes
the same step with its shard, taking part in every all-reduce. Started by rank 0 (`python -m pegboard.core.distributed.follower`), by
`pegboard serve --node-rank N` on another node, or by torchrun.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from pathlib import Path

import torch
from pegboard.core.cuda_graph_mixed import mixed_graph_max_tokens
from pegboard.core.distributed.group import Groups
from pegboard.core.distributed.launch import Children, fatal, watch_parent
from pegboard.core.distributed.shm_broadcast import ShmBroadcast
from pegboard.core.distributed.tensor_parallel import TensorParallel
from pegboard.core.distributed.topology import Topology
from pegboard.core.heap_freeze import freeze_heap
from pegboard.core.models.moe import moe_blocks
from pegboard.core.moe.apply import apply_placement
from pegboard.core.moe.router_skew import skew_router
from pegboard.core.process_exit import skip_final_collection
from pegboard.core.watchdog import stacks_on_sigusr1
from pegboard.sdk.expert_placement import ExpertPlacement

log = logging.getLogger("pegboard.distributed")


def run_follower(top: Topology, device: str, timeout_s: float, plan_shm: str | None = None) -> int:
    """Serve as rank `top.rank` until rank 0 says stop; returns the exit status. `plan_shm`:
    rank 0's shared-memory plan channel (`ShmBroadcast.spec`), when it spawned this rank."""
    if top.torchrun:  # torchrun signals every rank at once: rank 0 drains, then says stop
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    children = Children(top, device, timeout_s) if top.spawns else None
    channel = ShmBroadcast.attach(plan_shm, reader=top.rank - 1) if plan_shm else None
    groups = Groups(top, torch.device(top.device(device)), timeout_s, channel)
    tp = TensorParallel(top, groups, children)
    _, settings = tp.receive()  # rank 0's engine config
    if settings["ep_size"] > 1:
        tp.ep_redundant = settings["ep_num_redundant_experts"]
    Follower(tp, settings).run()
    tp.close()
    return 0


class Follower:
    """The model runner of a follower rank and the replay of rank 0's messages."""

    def __init__(self, tp: TensorParallel, settings: dict) -> None:
        from pegboard.core.config import EngineConfig
        from pegboard.core.default_model import default_model_dir
        from pegboard.core.model_runner import ModelRunner
        from pegboard.core.models.quantization import select_linear
        from pegboard.core.plugin_manager import PluginManager

        self.tp = tp
        self.config = c = EngineConfig(**settings)
        self.plugins = PluginManager()
        model_dir = Path(c.model) if c.model else default_model_dir()
        # The same linear plugin as rank 0: each rank builds its own layers with it.
        linear = select_linear(self.plugins, c, model_dir)
        self.runner = ModelRunner(
            model_dir,
            c.dtype,
            tp.device,
            c.max_model_len,
            progress=False,
            load_format=c.load_format,
            fused_kernels=not c.disable_fused_kernels,
            tp=tp,
            linear=linear,
        )
        if c.moe_router_skew > 0:  # the same biased router as rank 0's (a benchmark's skew)
            skew_router(moe_blocks(self.runner.model), c.moe_router_skew)
        self.attention = None
        self.pool = None

    def run(self) -> None:
        from pegboard.core.moe.kernel import select_moe_kernel

        select_moe_kernel(self.runner.model, self.config.moe_kernel)  # as rank 0's ExpertRuntime
        while True:
            kind, payload = self.tp.receive()
            if kind == "stop":
                break
            if kind == "forward":
                self.runner.forward(self.tp.receive_batch(payload))
            elif kind == "bind":
                self._bind(*payload)
            elif kind == "profile":
                self.runner.profile_activation_bytes(*payload)
            elif kind == "placement":
                self._place_experts(payload)
        if self.attention is not None:
            self.attention.close()
        self.runner.release_graphs()  # before NCCL's teardown, which waits for them

    def _place_experts(self, physical_to_logical: list[list[int]]) -> None:
        num_logical = self.runner.model.config.moe.num_experts
        placement = ExpertPlacement(torch.tensor(physical_to_logical), num_logical)
        apply_placement(self.runner.model, placement)

    def _bind(self, name: str, options: dict, layout, kept: bool, engine: dict) -> None:
        from pegboard.sdk.slots import PluginContext
        from pegboard.sdk.types import KVPool

        num_layers, shape, dtype, page_size, k_scales, v_scales, v_layout = layout
        if not kept or self.pool is None:
            self.pool = None  # the old pool's memory is free before the new one is allocated
            dt = getattr(torch, dtype.removeprefix("torch."))
            dev = self.runner.device
            k = [torch.zeros(shape, dtype=dt, device=dev) for _ in range(num_layers)]
            order = (0, 2, 3, 1) if v_layout == "hdp" else (0, 1, 2, 3)  # as rank 0 stores
            stored = [shape[i] for i in order]  # values (`KVPool.v_layout`)
            back = [order.index(i) for i in range(4)]
            v = [torch.zeros(stored, dtype=dt, device=dev).permute(back) for _ in range(num_layers)]
            self.pool = KVPool(k=k, v=v, page_size=page_size, v_layout=v_layout)
        self.pool.k_scales, self.pool.v_scales = k_scales, v_scales
        plugin = self.plugins.create("attention", name, options)
        plugin.setup(PluginContext(self.runner.info, self.runner.device, engine))
        backend = plugin.attention_kernel(model=self.runner.info, pool=self.pool)
        c = self.config
        self.runner.set_attention(
            backend,
            cuda_graph_max_bs=c.graph_max_bs,
            max_requests=c.max_running_requests,
            mixed_max_tokens=mixed_graph_max_tokens(c),
        )
        if self.attention is not None:
            self.attention.close()
        self.attention = plugin  # (its graphs stay: `run` releases them before the teardown)
        freeze_heap(c.gc_freeze)  # this rank's start-up (pool, graphs): as rank 0's engine


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pegboard-tp-rank", description=__doc__)
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--nnodes", type=int, default=1)
    p.add_argument("--node-rank", type=int, default=0)
    p.add_argument("--dist-init-addr", required=True)
    p.add_argument("--device", default="auto")
    p.add_argument("--dist-timeout", type=float, default=600.0)
    p.add_argument("--parent-pid", type=int, default=None)
    p.add_argument("--plan-shm", default=None, help="rank 0's shared-memory plan channel")
    args = p.parse_args(argv)
    stacks_on_sigusr1()
    if argv is None:  # a process of its own (not a caller's `main([...])`)
        skip_final_collection()
    logging.basicConfig(
        level="INFO", format=f"%(asctime)s rank{args.rank} %(levelname)s %(name)s: %(message)s"
    )
    if args.parent_pid is not None:
        watch_parent(args.parent_pid)
    per_node = args.world_size // args.nnodes
    top = Topology(
        args.rank,
        args.world_size,
        args.rank % per_node,
        args.nnodes,
        args.node_rank,
        args.dist_init_addr,
    )
    try:
        return run_follower(top, args.device, args.dist_timeout, args.plan_shm)
    except Exception as e:
        log.exception("rank %d failed", args.rank)
        fatal(f"tensor-parallel rank {args.rank} failed: {type(e).__name__}: {e}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
