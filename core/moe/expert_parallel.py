"""Expert parallelism (`--ep-size N`): each rank holds `P / N` of a sparse layer's `P` physical
expert slots (rank `r`: slots `[r * P / N, (r + 1) * P / N)`), as the placement lays them out.

The ranks are the tensor-parallel group: attention, dense MLPs, the embedding and the LM head
are split as under `--tp-size N`, and the attention's all-reduce leaves every rank with the
whole batch's hidden states. So there is nothing to dispatch: every rank routes every token
(the same router, the same result), keeps the (token, expert) pairs whose physical slot it
holds (`localize`: local slot ids, -1 for the others), runs its experts on them with the
ordinary per-rank expert computation (`MoEExperts.forward`, or a fused kernel in its place),
and `combine` sums the ranks' partial outputs with one all-reduce per sparse layer, `[T, H]`
(ring: 2 (N-1)/N * T * H elements sent per rank), the collective a dense tensor-parallel MLP
does. An all-to-all dispatch moves each token to its experts' ranks (k * T * H elements out,
the same back) and pays off only when the tokens are split over the ranks (data-parallel
attention), which pegboard does not do.

A placement change (`move`) sends each rank only the experts its new slots need that it does
not hold already: a plan every rank computes from the old and new maps, carried out with
point-to-point sends and receives (`torch.distributed.batch_isend_irecv`).
"""

from __future__ import annotations

import torch


class ExpertParallel:
    """Rank `rank` of `size`'s share of a layer's `num_physical` slots, and the collectives
    (`communicate`: `all_reduce(x)`, `exchange(sends, receives)`: the tensor-parallel
    `pegboard.core.distributed.group.Groups`)."""

    def __init__(self, rank: int, size: int, num_physical: int, communicate) -> None:
        self.rank = rank
        self.size = size
        self.per_rank = num_physical // size
        self.first = rank * self.per_rank
        self.comm = communicate
        self.transfers = 0  # expert tensors this rank sent or received (moves between ranks)

    def localize(
        self, slots: torch.Tensor, weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical slots `[T, k]` -> this rank's local slot ids (-1 for pairs another rank
        holds) and the routing weights with those pairs zeroed. No host sync."""
        local = slots - self.first
        mine = (local >= 0) & (local < self.per_rank)
        return local.masked_fill(~mine, -1), weights.masked_fill(~mine, 0)

    def combine(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum of the ranks' partial outputs `[T, H]` (every rank gets it)."""
        return self.comm.all_reduce(partial)

    def move(self, weights: torch.Tensor, old: list[int], new: list[int]) -> torch.Tensor:
        """This rank's expert weights `[P / N, ...]` laid out by the new slot -> expert row
        `new`, from `weights` laid out by `old` (both rows are the whole layer's `P` slots,
        the same on every rank). Every rank must call it (it exchanges with the others)."""
        moved = torch.empty_like(weights)
        sends, receives = [], []
        for tag, (src, dst) in enumerate(transfer_plan(old, new, self.size)):
            src_rank, dst_rank = src // self.per_rank, dst // self.per_rank
            if dst_rank == self.rank and src_rank == self.rank:
                moved[dst - self.first].copy_(weights[src - self.first])
            elif src_rank == self.rank:
                sends.append((weights[src - self.first], dst_rank, tag))
            elif dst_rank == self.rank:
                receives.append((moved[dst - self.first], src_rank, tag))
        self.comm.exchange(sends, receives)
        self.transfers += len(sends) + len(receives)
        return moved


def transfer_plan(old: list[int], new: list[int], size: int) -> list[tuple[int, int]]:
    """(source slot, destination slot) for every slot of the new row `new`: a slot of the same
    rank that holds the expert now when there is one (a local copy), else one of the expert's
    current slots, taken in turn so a hot expert's copies are sent by all its holders. Every
    rank computes the same plan, in the same order, which is what pairs sends with receives."""
    per_rank = len(old) // size
    holders: dict[int, list[int]] = {}
    for slot, expert in enumerate(old):
        holders.setdefault(expert, []).append(slot)
    turn: dict[int, int] = {}
    plan = []
    for dst, expert in enumerate(new):
        slots = holders[expert]
        same_rank = [s for s in slots if s // per_rank == dst // per_rank]
        if same_rank:
            plan.append((same_rank[0], dst))
        else:
            n = turn.get(expert, 0)
            turn[expert] = n + 1
            plan.append((slots[n % len(slots)], dst))
    return plan
