"""Expert placement at step boundaries: the engine's one call into MoE serving.

`ExpertRuntime.start` asks the `expert_placement` slot for the first placement (or reads
`--init-expert-location`), `step_boundary` records the pass and, every
`--eplb-rebalance-num-iterations` steps, asks again with the recorded load and moves the
expert weights (`apply.apply_placement`). A step boundary is between two forwards, and replicas
are copies, so no in-flight request's output changes. The placement is checked first; an
invalid one is logged naming the plugin and the current placement stays. Under expert
parallelism this runs on rank 0, which hands each placement to the other ranks
(`TensorParallel.share_placement`) before all of them move their experts together.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from pegboard.core.models.moe import moe_blocks
from pegboard.core.moe.apply import apply_placement
from pegboard.core.moe.flags import check_moe
from pegboard.core.moe.kernel import select_moe_kernel
from pegboard.core.moe.recorder import ExpertLoadRecorder
from pegboard.core.moe.router_skew import skew_router
from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology

log = logging.getLogger("pegboard.moe")


class ExpertRuntime:
    def __init__(self, engine, model: torch.nn.Module) -> None:
        cfg = engine.config
        self.engine = engine
        self.model = model
        self.blocks = moe_blocks(model)
        moe = model.config.moe
        self.topology = ExpertTopology(
            num_layers=len(self.blocks),
            num_logical=moe.num_experts,
            num_physical=moe.num_experts + cfg.ep_num_redundant_experts,
            ep_size=cfg.ep_size,
            num_nodes=cfg.nnodes,
        )
        self.every = cfg.eplb_rebalance_num_iterations
        mode = cfg.expert_distribution_recorder_mode or "stat"
        device = self.blocks[0].experts.w13.device
        self.recorder = ExpertLoadRecorder(
            len(self.blocks),
            moe.num_experts,
            device,
            mode,
            window=self.every,
            num_slots=self.topology.num_physical,
        )
        # Recording costs one index_add per layer: only for a load-driven placement or on request.
        self.recording = cfg.expert_distribution_recorder_mode is not None or (
            cfg.expert_placement not in (None, "static")
        )
        for block in self.blocks:
            block.recorder = self.recorder if self.recording else None
        self.steps = 0
        self.rebalances = 0
        self.balancedness = 1.0
        self.kernel: str | None = None  # the routed experts' computation (triton or torch)

    @classmethod
    def create(cls, engine, model: torch.nn.Module) -> ExpertRuntime | None:
        """The runtime of an MoE model (placement, recorder), or None for a dense model."""
        check_moe(engine.config, model.config)  # the CLI checked before loading; LLM(...) here
        if getattr(model.config, "moe", None) is None or not moe_blocks(model):
            return None
        runtime = cls(engine, model)
        runtime.kernel = select_moe_kernel(model, engine.config.moe_kernel)
        if engine.config.moe_router_skew > 0:
            runtime.skew_router(engine.config.moe_router_skew)
        runtime.start(engine.config.init_expert_location)
        return runtime

    def skew_router(self, strength: float) -> None:
        """Benchmarks: bias each layer's router logits by `-strength * log(1 + rank)` over a
        random order of its experts, so expert load follows a Zipf-like law."""
        skew_router(self.blocks, strength)

    def start(self, location: str) -> None:
        if location == "trivial":
            self.rebalance()
            return
        raw = json.loads(Path(location).read_text())
        placement = ExpertPlacement(
            torch.tensor(raw["physical_to_logical"]), self.topology.num_logical
        )
        self._apply(placement, f"--init-expert-location {location}")

    def step_boundary(self) -> None:
        """Between two steps: close the recorded pass; rebalance every N steps."""
        if not self.recording:
            return
        self.recorder.end_pass()
        self.steps += 1
        if self.steps % self.every == 0:
            self.rebalance()

    def rebalance(self) -> None:
        load = self.recorder.load()
        if load.sum() > 0:  # how evenly the live placement spread the window's tokens
            self.balancedness = rank_balancedness(self.recorder.slot_load(), self.topology.ep_size)
        placement = self.engine.hook.place_experts(load=load, topology=self.topology)
        plugin = self.engine.plugins.active("expert_placement").name
        self._apply(placement, f"expert_placement plugin {plugin!r}")

    def report(self) -> dict:
        """The bench JSON's `moe` entry."""
        return {
            "placement": self.engine.plugins.active("expert_placement").name,
            "kernel": self.kernel,
            "experts": self.topology.num_logical,
            "physical_slots": self.topology.num_physical,
            "ep_size": self.topology.ep_size,
            "router_skew": self.engine.config.moe_router_skew,
            "balancedness": round(self.balancedness, 4),
            "rebalances": self.rebalances,
        }

    def metrics(self) -> dict[str, float]:
        """Gauges for the step snapshot (`MetricsSnapshot.extra`): the live placement's
        balancedness (mean/max per-rank expert tokens over the last window, 1.0 until a window
        was recorded) and the number of placements applied."""
        return {"eplb_balancedness": self.balancedness, "eplb_rebalances": float(self.rebalances)}

    def current(self) -> ExpertPlacement:
        rows = torch.cat([b.placement.physical_to_logical.cpu() for b in self.blocks])
        return ExpertPlacement(rows, self.topology.num_logical)

    def _apply(self, placement: object, source: str) -> None:
        if not isinstance(placement, ExpertPlacement):
            log.error("%s returned %r, not an ExpertPlacement; placement kept", source, placement)
            return
        problems = placement.problems(self.topology)
        if problems:
            log.error(
                "%s returned an invalid placement (%s); placement kept", source, "; ".join(problems)
            )
            return
        if (
            getattr(self.engine, "tp", None) is not None
        ):  # expert parallelism: every rank moves its experts
            self.engine.tp.share_placement(placement.physical_to_logical)
        apply_placement(self.model, placement)
        self.rebalances += 1


def rank_balancedness(slot_load: torch.Tensor, ep_size: int) -> float:
    """mean/max tokens per rank, averaged over layers (1.0: even), from the tokens each
    physical slot `[layers, slots]` computed (rank `r` holds the `r`-th `slots / ep_size`)."""
    ranks = slot_load.double().view(slot_load.shape[0], ep_size, -1).sum(dim=2)
    peak = ranks.max(dim=1).values
    ratio = torch.where(peak > 0, ranks.mean(dim=1) / peak.clamp(min=1e-12), torch.ones_like(peak))
    return float(ratio.mean())
