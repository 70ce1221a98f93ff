"""The mixture-of-experts fields of an HF config (Qwen3-MoE, Qwen2-MoE, Mixtral), parsed and
checked: how many experts, how many each token picks, whether the picked weights are
renormalised, the expert width, which layers are sparse and the shared expert (Qwen2-MoE)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pegboard.core.models.errors import ModelLoadError

#: Families whose layers may be sparse, and the name of their MoE submodule in checkpoints.
MOE_FAMILIES = {"qwen3_moe": "mlp", "qwen2_moe": "mlp", "mixtral": "block_sparse_moe"}


@dataclass(frozen=True)
class MoEConfig:
    """`num_experts` routed experts of width `expert_size`; each token takes the `top_k`
    largest softmax probabilities, divided by their sum when `norm_topk_prob`.
    `float_weights`: the routing weights stay float32 when multiplied in (Mixtral) instead of
    being cast to the model dtype first (Qwen). Layer `i` is sparse unless it is in
    `dense_layers` or `(i + 1) % sparse_step != 0`; its dense MLP is `intermediate_size` wide.
    `shared_expert_size` > 0: a SwiGLU shared expert scaled by `sigmoid(shared_expert_gate)`.
    Expert parallelism (`pegboard.core.moe.expert_parallel`) sets the last three on a rank's
    config: `num_physical` slots per layer (0: one per expert) split over `ep_size` ranks, of
    which this one (`ep_rank`) holds its share."""

    num_experts: int
    top_k: int
    expert_size: int
    norm_topk_prob: bool
    float_weights: bool
    module: str
    sparse_step: int = 1
    dense_layers: tuple[int, ...] = ()
    shared_expert_size: int = 0
    num_physical: int = 0
    ep_rank: int = 0
    ep_size: int = 1

    def is_sparse(self, layer: int) -> bool:
        return layer not in self.dense_layers and (layer + 1) % self.sparse_step == 0

    def checkpoint_names(self) -> dict[str, str]:
        """Our projection -> this family's per-expert checkpoint tensor name (under
        `...{module}.experts.{expert}.`)."""
        if self.module == "block_sparse_moe":  # Mixtral: w1 gate, w3 up, w2 down
            return {"gate": "w1", "up": "w3", "down": "w2"}
        return {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}


def parse_moe(raw: dict[str, Any], family: str, source: str) -> MoEConfig | None:
    """The MoE fields of a config of `family`; None for a dense family."""
    if family not in MOE_FAMILIES:
        return None

    def positive(name: str, default: int | None = None) -> int:
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{source}: {name} must be a positive integer, got {value!r}")
        return value

    # transformers 5 writes num_local_experts for every family; older Qwen configs num_experts.
    key = "num_experts" if "num_experts" in raw else "num_local_experts"
    experts = positive(key)
    if family == "mixtral":
        size = positive("intermediate_size")
        norm, float_weights = True, True
    else:
        size = positive("moe_intermediate_size")
        norm, float_weights = bool(raw.get("norm_topk_prob", False)), False
    top_k = positive("num_experts_per_tok")
    if top_k > experts:
        raise ModelLoadError(
            f"{source}: num_experts_per_tok ({top_k}) exceeds the number of experts ({experts})"
        )
    dense = raw.get("mlp_only_layers") or []
    if not isinstance(dense, list) or not all(isinstance(i, int) for i in dense):
        raise ModelLoadError(f"{source}: mlp_only_layers must be a list of layer indices")
    shared = positive("shared_expert_intermediate_size") if family == "qwen2_moe" else 0
    return MoEConfig(
        num_experts=experts,
        top_k=top_k,
        expert_size=size,
        norm_topk_prob=norm,
        float_weights=float_weights,
        module=MOE_FAMILIES[family],
        sparse_step=positive("decoder_sparse_step", 1),
        dense_layers=tuple(dense),
        shared_expert_size=shared,
    )
