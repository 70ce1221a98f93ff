"""A sparse mixture-of-experts block (Qwen3-MoE, Qwen2-MoE, Mixtral) over stacked expert weights.

Routing is exactly transformers': `softmax(x @ gate.T)` in float32, the `top_k` largest
probabilities, divided by their sum when the config says so, cast to the model dtype (Qwen) or
kept in float32 (Mixtral). The routed experts are *logical*; the weights are stored by *physical*
slot (`MoEExperts.w13 [P, 2I, H]`, `w2 [P, H, I]`), and the block's `ExpertPlacement` (the
`expert_placement` slot's answer, `pegboard.sdk.expert_placement`) maps each logical expert to
its replicas. Redundant replicas are exact copies, so a placement never changes results.

With `MoEExperts.kernel` set (`pegboard.core.moe.kernel`, `--moe-kernel`) the fused Triton MoE
(`pegboard.core.kernels.fused_moe.fused_experts`, the same arguments as `MoEExperts.forward`)
computes the experts, and the block's `router_kernel` does the softmax and top-k in one kernel
(`fused_moe_topk`).

`MoEExperts.forward` is the plain PyTorch path (the CPU path and the reference): tokens sorted
by physical expert, one GEMM pair per expert that has tokens, a weighted combine; for a few
(token, expert) pairs (decode), per-pair gathered weights and batched mat-vecs instead.

With expert parallelism (`pegboard.core.moe.expert_parallel`) a rank's `MoEExperts` holds only
its slots `[first_slot, first_slot + num_local)`; the block gives it local slot ids, -1 for the
pairs another rank computes, and the ranks' partial outputs are summed (`MoEBlock.ep`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pegboard.core.models.config import ModelConfig
from pegboard.core.models.layers import Linear, silu_and_mul
from pegboard.core.models.weights import TensorTarget
from pegboard.sdk.expert_placement import ExpertPlacement
from torch import nn

#: Up to this many (token, expert) pairs a step gathers the experts' weights per pair (no host
#: sync; CUDA graphs capture it); above it, tokens are sorted by expert and each expert's rows
#: run as one GEMM pair.
GATHER_MAX_PAIRS = 64


class _Replicas:
    """A `copy_` target that writes one checkpoint tensor into every slot holding the expert."""

    def __init__(self, data: torch.Tensor, slots: list[int], start: int, rows: int) -> None:
        self.data, self.slots, self.start, self.rows = data, slots, start, rows

    def copy_(self, tensor: torch.Tensor) -> None:
        for slot in self.slots:
            self.data[slot, self.start : self.start + self.rows].copy_(tensor)


class ExpertTarget(TensorTarget):
    """Where one expert's checkpoint projection goes: rows of its slots in a stacked tensor."""

    def __init__(self, param: nn.Parameter, slots: list[int], start: int, rows: int) -> None:
        super().__init__(param, start, rows)
        self.slots = slots

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.rows, *self.param.shape[2:])

    def view(self) -> _Replicas:  # type: ignore[override]
        return _Replicas(self.param.data, self.slots, self.start, self.rows)


class MoEExperts(nn.Module):
    """The routed experts of one layer, stacked by physical slot (gate and up fused). A slot
    id of -1 given to `forward` is a pair another rank computes (expert parallelism): it adds
    nothing."""

    def __init__(
        self, num_slots: int, hidden: int, size: int, names: dict[str, str], prefix: str
    ) -> None:
        super().__init__()
        self.size = size
        self.prefix = prefix  # the checkpoint's name for these experts
        self.names = names
        # fused_experts(x, slots, weights, w13, w2) when the Triton kernel is selected
        self.kernel: Callable | None = None
        self.w13 = nn.Parameter(torch.empty(num_slots, 2 * size, hidden), requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(num_slots, hidden, size), requires_grad=False)
        self.placement: ExpertPlacement | None = None  # set by the block (all ranks' slots)
        self.first_slot = 0  # the physical slot of w13[0] (expert parallelism: rank * num_local)

    def _gathered(
        self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Few (token, expert) pairs (decode): gather each pair's expert weights and run
        batched mat-vecs: no host sync, so CUDA graphs can capture it."""
        tokens, k = slots.shape
        weights = weights.masked_fill(slots < 0, 0)  # another rank's pairs add nothing
        flat = slots.reshape(-1).clamp(min=0)
        rows = x.repeat_interleave(k, dim=0).unsqueeze(-1)  # [n, H, 1]
        act = silu_and_mul(torch.bmm(self.w13[flat], rows).squeeze(-1))
        out = torch.bmm(self.w2[flat], act.unsqueeze(-1)).squeeze(-1)
        scaled = (out * weights.reshape(-1, 1)).to(x.dtype)
        return scaled.view(tokens, k, -1).sum(dim=1)

    def checkpoint_targets(self, module_path: str) -> dict[str, TensorTarget]:
        """Checkpoint name -> target for every expert (`weights.checkpoint_targets` asks)."""
        assert self.placement is not None
        prefix = self.prefix
        targets: dict[str, TensorTarget] = {}
        first, local = self.first_slot, self.w13.shape[0]
        for expert in range(self.placement.num_logical):
            # Another rank's experts are read and dropped (no slot here).
            slots = [s - first for s in self.placement.slots_of(expert) if 0 <= s - first < local]
            base = f"{prefix}.{expert}"
            targets[f"{base}.{self.names['gate']}.weight"] = ExpertTarget(
                self.w13, slots, 0, self.size
            )
            targets[f"{base}.{self.names['up']}.weight"] = ExpertTarget(
                self.w13, slots, self.size, self.size
            )
            targets[f"{base}.{self.names['down']}.weight"] = ExpertTarget(
                self.w2, slots, 0, self.w2.shape[1]
            )
        return targets

    def forward(self, x: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """`x [T, H]`, `slots [T, k]` physical experts, `weights [T, k]` -> `[T, H]`."""
        if self.kernel is not None:
            return self.kernel(x, slots, weights, self.w13, self.w2)
        if slots.numel() <= GATHER_MAX_PAIRS:
            return self._gathered(x, slots, weights)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            # Raised before any host sync, so the capture fails cleanly and decode runs eagerly.
            raise RuntimeError("the PyTorch MoE path reads expert counts on the host; no graphs")
        tokens, k = slots.shape
        flat = slots.reshape(-1)
        order = torch.argsort(flat, stable=True)  # another rank's pairs (-1) first
        skipped, *counts = torch.bincount(flat + 1, minlength=self.w13.shape[0] + 1).tolist()
        sorted_x = x[order // k]
        out = torch.empty_like(sorted_x)
        out[:skipped] = 0
        start = skipped
        for slot, n in enumerate(counts):
            if n:
                seg = sorted_x[start : start + n]
                act = silu_and_mul(F.linear(seg, self.w13[slot]))
                out[start : start + n] = F.linear(act, self.w2[slot])
                start += n
        scaled = (out * weights.reshape(-1)[order, None]).to(x.dtype)
        combined = torch.zeros_like(scaled).index_copy_(0, order, scaled)
        return combined.view(tokens, k, -1).sum(dim=1)


class Router(nn.Module):
    """The router's `[E, H]` weight, under the checkpoint's name (`...mlp.gate.weight`, or
    Mixtral's `...block_sparse_moe.gate.weight`)."""

    def __init__(self, hidden: int, experts: int, name: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(experts, hidden), requires_grad=False)
        self.name = name

    def checkpoint_targets(self, module_path: str) -> dict[str, TensorTarget]:
        return {self.name: TensorTarget(self.weight)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on SwiGLU expert, scaled by `sigmoid(shared_expert_gate(x))`."""

    def __init__(self, cfg: ModelConfig, prefix: str, linear) -> None:
        super().__init__()
        size = cfg.moe.shared_expert_size
        self.gate_up_proj = linear(
            f"{prefix}.gate_up_proj",
            cfg.hidden_size,
            2 * size,
            {"gate_proj": size, "up_proj": size},
            False,
        )
        self.down_proj = linear(f"{prefix}.down_proj", size, cfg.hidden_size, None, False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


class MoEBlock(nn.Module):
    """Router, routed experts and (Qwen2-MoE) the gated shared expert of one sparse layer.

    `placement` (an `ExpertPlacement`, identity until the engine sets one) maps the router's
    logical experts to physical slots; `recorder` (or None) counts each layer's logical expert
    load on the device (`pegboard.core.moe.recorder`); `router_bias` (or None, `[E]`) is added
    to the router logits (a benchmark's skewed router); `ep` (or None, an
    `pegboard.core.moe.expert_parallel.ExpertParallel`) makes the block one rank's share of an
    expert-parallel layer."""

    def __init__(self, cfg: ModelConfig, layer: int, moe_index: int, linear) -> None:
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        self.layer = layer
        self.moe_index = moe_index  # this block's row among the model's sparse layers
        self.top_k = moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.float_weights = moe.float_weights
        # softmax_topk(logits, k, renormalize, dtype) when the Triton MoE kernel is selected
        self.router_kernel: Callable | None = None
        prefix = f"model.layers.{layer}.{moe.module}"
        self.gate = Router(cfg.hidden_size, moe.num_experts, f"{prefix}.gate.weight")
        physical = moe.num_physical or moe.num_experts
        self.experts = MoEExperts(
            physical // moe.ep_size,
            cfg.hidden_size,
            moe.expert_size,
            moe.checkpoint_names(),
            f"{prefix}.experts",
        )
        self.shared_expert = (
            SharedExpert(cfg, f"{prefix}.shared_expert", linear) if moe.shared_expert_size else None
        )
        self.shared_expert_gate = (
            Linear(cfg.hidden_size, 1, bias=False) if moe.shared_expert_size else None
        )
        self.experts.first_slot = moe.ep_rank * (physical // moe.ep_size)
        self.recorder = None
        self.router_bias: torch.Tensor | None = None
        self.ep = None
        # Static: slot i holds expert i % E (the replica dimension as `apply_placement` keeps it).
        row = torch.arange(physical, device="cpu") % moe.num_experts
        self.set_placement(ExpertPlacement(row, moe.num_experts, physical - moe.num_experts + 1))

    def set_placement(self, placement: ExpertPlacement) -> None:
        """Route by `placement` (one layer's maps); the weights must already be in its slots."""
        self.placement = placement
        self.experts.placement = placement

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """transformers' top-k routing: `(weights [T, k], logical experts [T, k])`."""
        logits = self.gate(x)
        if self.router_bias is not None:
            logits = logits + self.router_bias.to(logits.dtype)
        if self.router_kernel is not None:
            dtype = torch.float32 if self.float_weights else x.dtype
            return self.router_kernel(logits, self.top_k, self.norm_topk_prob, dtype)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float_weights:
            weights = weights.to(x.dtype)
        return weights, experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.placement.physical_to_logical.device != x.device:
            self.set_placement(self.placement.to(x.device))
        weights, experts = self.route(x)
        slots = self.placement.to_physical(experts)
        if self.recorder is not None:
            self.recorder.record(self.moe_index, experts, slots)
        if self.ep is not None:
            slots, weights = self.ep.localize(slots, weights)
        out = self.experts(x, slots, weights)
        if self.shared_expert is not None:  # under EP: this rank's columns of it
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return out if self.ep is None else self.ep.combine(out)


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """The model's sparse blocks in layer order."""
    return [m for m in model.modules() if isinstance(m, MoEBlock)]
