"""The all-reduce after a row-parallel projection fused with the RMSNorm it feeds (issue 11).

Each decoder layer ends its attention and its MLP with a row-parallel projection (o_proj,
down_proj) whose per-rank partial outputs are summed over the ranks; the sum is then added to
the residual stream and normalised by the next RMSNorm (post_attention_layernorm; the next
layer's input_layernorm or the final norm). Unfused, at decode batch sizes that is four
kernels: the projection, a staging copy into the symmetric buffer, torch's one-shot all-reduce
(a barrier at each end) and the norm. Fused (as vLLM and SGLang do for small batches), the
projection writes straight into this rank's symmetric buffer and one kernel
(`pegboard.core.kernels.allreduce_norm`) waits for the peers, sums their rows, adds the
residual and normalises.

`FusedAllReduceNorm.create` (every rank at load, `ModelShard.install`) allocates the symmetric
buffer — two slots of `MAX_ROWS` rows: o_proj writes slot 0 and down_proj slot 1, so
consecutive fused all-reduces alternate (the kernel's docstring says why that makes a second
barrier unnecessary) — and runs the kernel once against NCCL's all-reduce and the plain norm;
the ranks agree on the result, so either all of them fuse or none does. `join` wires one
projection to its norm.

Fused only where it can run and pays: CUDA with torch's symmetric memory (where the one-shot
all-reduce is chosen, `pegboard.core.distributed.group`), a dense model (no MoE layers, whose
block all-reduces itself), the fused kernels on (the norm has its Triton kernel) and at most
`MAX_ROWS` rows (decode; a prefill chunk all-reduces as before). `PEGBOARD_TP_FUSED_NORM=0`
keeps the unfused path everywhere (the A/B of `scripts/bench_allreduce.py` and the
`llama-bs1-tp2` device job).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import nn

log = logging.getLogger("pegboard.distributed")

#: The most rows (tokens of a step) the fused path takes; larger steps all-reduce unfused. On
#: two H200s (session 8, `allreduce`) the fused kernel took 5.0 / 6.6 / 17.2 µs at 1 / 8 / 64
#: rows against 9.3 / 10.4 / 12.8 unfused: one program per row stops paying past a few rows.
MAX_ROWS = 16
#: Slots of the symmetric buffer: o_proj's and down_proj's partial sums.
ATTENTION, MLP = 0, 1
#: The start-up check's bound on one barrier wait (retries of an atomic over NVLink: seconds).
CHECK_SPINS = 1 << 24


class FusedAllReduceNorm:
    """This rank's symmetric buffer `[2, MAX_ROWS, hidden]` and the fused kernel over it."""

    def __init__(self, buffer: torch.Tensor, handle, all_reduce: Callable) -> None:
        self.buffer = buffer
        self.buffer_ptrs = handle.buffer_ptrs_dev  # every rank's buffer address (device array)
        self.signal_pads = handle.signal_pad_ptrs_dev
        self.rank = handle.rank
        self.world_size = handle.world_size
        self.all_reduce = all_reduce  # the unfused path: `Groups.all_reduce`
        self.max_rows = buffer.shape[1]
        self.failed = torch.zeros(1, dtype=torch.int32, device=buffer.device)  # a barrier gave up

    @classmethod
    def create(
        cls, group, device: torch.device, hidden: int, dtype: torch.dtype, all_reduce: Callable
    ) -> FusedAllReduceNorm | None:
        """The fused path over `group`'s ranks (a collective: every rank calls it), or None
        where it does not run or its check failed on any rank."""
        if os.environ.get("PEGBOARD_TP_FUSED_NORM", "1") == "0":
            return None
        fused, reason = None, None
        try:
            import torch.distributed._symmetric_memory as symm_mem

            flat = symm_mem.empty(2 * MAX_ROWS * hidden, dtype=dtype, device=device)
            handle = symm_mem.rendezvous(flat, group.group_name)
            if handle.signal_pad_size < MAX_ROWS * handle.world_size * 4:
                raise RuntimeError(f"a signal pad of {handle.signal_pad_size} bytes is too small")
            fused = cls(flat.view(2, MAX_ROWS, hidden), handle, all_reduce)
            fused.check(group)
        except Exception as e:  # an allocation, a kernel or a result that fails here
            reason = f"{type(e).__name__}: {e}"
        agreed = torch.tensor([reason is None], dtype=torch.int32, device=device)
        dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=group)
        if not agreed.item():
            log.info("fused all-reduce + RMSNorm off: %s", reason or "failed on another rank")
            return None
        log.info("fused all-reduce + RMSNorm on (up to %d rows)", MAX_ROWS)
        return fused

    def check(self, group, rows: int = 3, eps: float = 1e-6) -> None:
        """Both slots once against NCCL's all-reduce and the plain fused add + norm kernel."""
        from pegboard.core.kernels.norm import rms_norm

        hidden, device, dtype = self.buffer.shape[2], self.buffer.device, self.buffer.dtype
        same = torch.Generator(device=device).manual_seed(0)  # residual and weight: every rank's
        own = torch.Generator(device=device).manual_seed(1 + dist.get_rank(group))
        residual = torch.randn(rows, hidden, generator=same, device=device).to(dtype)
        weight = torch.randn(hidden, generator=same, device=device).to(dtype)
        for slot in (ATTENTION, MLP):
            partial = torch.randn(rows, hidden, generator=own, device=device).to(dtype)
            self.slot(slot, rows).copy_(partial)
            normed, summed = self.add_norm(slot, residual, weight, eps, max_spins=CHECK_SPINS)
            if self.failed.item():
                raise RuntimeError("a peer never reached the fused kernel's barrier")
            dist.all_reduce(partial, group=group)
            expected_normed, expected_summed = rms_norm(partial, weight, eps, residual)
            torch.testing.assert_close(summed, expected_summed, rtol=2**-7, atol=1e-3)
            torch.testing.assert_close(normed, expected_normed, rtol=2**-7, atol=1e-3)

    def release(self) -> None:
        """Free the symmetric buffer (before the group goes); the fused path cannot run after."""
        self.buffer = None

    def slot(self, slot: int, rows: int) -> torch.Tensor:
        """`[rows, hidden]` of this rank's buffer: where projection `slot` writes."""
        return self.buffer[slot, :rows]

    def takes(self, rows: int) -> bool:
        return 1 <= rows <= self.max_rows

    def add_norm(
        self,
        slot: int,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        max_spins: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(normed, new residual)` of the ranks' partials in `slot` plus `residual`
        (`max_spins`: bound the barrier's wait, see `allreduce_add_norm`)."""
        from pegboard.core.kernels.allreduce_norm import NO_LIMIT, allreduce_add_norm

        hidden = self.buffer.shape[2]
        rows = residual.reshape(-1, hidden)
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        return allreduce_add_norm(
            self.buffer_ptrs,
            self.signal_pads,
            slot * self.max_rows * hidden,
            self.rank,
            self.world_size,
            rows,
            weight,
            eps,
            self.failed,
            NO_LIMIT if max_spins is None else max_spins,
        )

    def join(self, projection: nn.Module, norm: nn.Module, slot: int) -> None:
        """Route `projection`'s output into `norm` through the fused kernel (its forward and
        the norm's are replaced; see `_Joined`)."""
        _Joined(self, projection, norm, slot)


class _Joined:
    """A row-parallel projection and the RMSNorm its output goes to next.

    The projection, on a step the fused path takes, writes its partial sum into the slot and
    returns it unreduced; the decoder hands that tensor to the norm (with the residual) next,
    which then runs the fused kernel. On other steps the projection all-reduces as before and
    the norm runs unchanged. Python decides by the step's row count while the model is traced
    for a CUDA graph, so a replay runs whichever path its capture took, on every rank alike."""

    def __init__(self, fused: FusedAllReduceNorm, projection: nn.Module, norm: nn.Module, slot):
        self.fused, self.projection, self.norm, self.slot = fused, projection, norm, slot
        self.project_unfused, self.norm_unfused = projection.forward, norm.forward
        self.pending: torch.Tensor | None = None  # the partial returned, not yet normalised
        projection.forward = self.project
        norm.forward = self.add_norm

    def project(self, x: torch.Tensor, gate_up: bool = False) -> torch.Tensor:
        """The projection's forward. `gate_up` (passed to a dense `Linear` down projection
        only, `DecoderMLP`): x is the MLP's gate/up output, SiLU-and-mul applied by the layer."""
        rows = x.numel() // x.shape[-1]
        self.pending = None  # (one a failed forward left behind)
        if getattr(self.norm, "kernel", None) is None or not self.fused.takes(rows):
            return self.fused.all_reduce(self._forward_unfused(x, gate_up))
        out = self.fused.slot(self.slot, rows)
        self._project_into(x.reshape(rows, x.shape[-1]), out, gate_up)
        self.pending = out
        return out

    def _forward_unfused(self, x: torch.Tensor, gate_up: bool) -> torch.Tensor:
        # other layer types' forward takes no `gate_up` (they never get gate/up rows)
        return self.project_unfused(x, gate_up=True) if gate_up else self.project_unfused(x)

    def _project_into(self, x: torch.Tensor, out: torch.Tensor, gate_up: bool) -> None:
        from pegboard.core.models.layers import Linear

        layer = self.projection
        if isinstance(layer, Linear) and layer.kernel is not None:  # the GEMV kernels
            layer.kernel(x, layer.weight, layer.bias, out=out, gate_up=gate_up)
        elif isinstance(layer, nn.Linear) and not gate_up:
            if layer.bias is None:
                torch.mm(x, layer.weight.t(), out=out)
            else:
                torch.addmm(layer.bias, x, layer.weight.t(), out=out)
        else:  # another layer type (or gate/up rows): its output copied into the slot
            out.copy_(self._forward_unfused(x, gate_up))

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.pending is None:
            return self.norm_unfused(x, residual)
        pending, self.pending = self.pending, None
        if x is not pending or residual is None:
            raise RuntimeError(
                "tensor parallelism: a projection's partial sum did not go to its norm next "
                "(set PEGBOARD_TP_FUSED_NORM=0 for this model)"
            )
        weight = self.norm.weight
        return self.fused.add_norm(self.slot, residual, weight, self.norm.eps)
