"""What checking plugins' results costs per engine step (`pegboard.core.contract`).

A decode step of `batch` running requests: the plan's rules (`PlanChecker.rules`, on the lists
of requests and token counts that the engine builds from the plan to run the step anyway) and
`check_sample` on the sampler's token tensor, then the range check of the ids where they reach
the host (`check_token_ids` on the int64 array of the pinned copy for a device tensor; a CPU
tensor's ids are checked inside `check_sample` with one `aminmax`).

Two figures per batch size, for a plan not in the running queue's order (a plan that is the
queue itself, in order, costs one list comparison, less than either): `batch_<n>`, a step whose
batch differs from the last step's (one `set` over the batch and one over the queue), and
`batch_<n>_same_batch`, the steady state of decoding (the same requests against the same
running queue as last step: two list comparisons).
Best of 50 short rounds: the checks' own cost, not the noise of a shared machine.
"""

from __future__ import annotations

import time

import torch
from pegboard.core.contract import PlanChecker, check_sample, check_token_ids
from pegboard.sdk.types import (
    Request,
    RequestStatus,
    SampleOutput,
    ScheduledRequest,
    SchedulePlan,
    StepBudget,
)

VOCAB = 32000


class _RoomyCache:
    """The queries `check_plan` makes of a KV cache, with room to spare."""

    page_size = 16
    num_free_pages = 1 << 20

    def pages_needed(self, request: Request, n: int) -> int:
        return 1


def contract_check_us(
    batch: int,
    device: str | torch.device = "cpu",
    repeat: int = 20,
    same_batch: bool = False,
    rounds: int = 50,
) -> float:
    """Microseconds the contract checks add to a decode step of `batch` requests (with
    `same_batch`, of the same requests as the step before)."""
    running = []
    for i in range(batch):
        r = Request(list(range(1, 101)), request_id=f"r{i}")
        r.status, r.num_computed_tokens = RequestStatus.RUNNING, 100
        r.token_ids.append(7)  # one uncomputed token: a decode
        running.append(r)
    plan = SchedulePlan([ScheduledRequest(r, 1) for r in running])
    requests = [s.request for s in plan.scheduled]
    tokens = [s.num_tokens for s in plan.scheduled]
    budget = StepBudget(8192, max(batch, 1), 4096)
    kv = _RoomyCache()
    tokens_out = torch.randint(0, VOCAB, (batch,), device=device)
    out = SampleOutput(tokens_out, [None] * batch)
    host = tokens_out.cpu().numpy() if tokens_out.device.type != "cpu" else None
    running.reverse()  # not the plan's order (as after a preemption): the cheapest case is not
    # measured, a plan that is the running queue itself, in order (one list comparison)
    checkers = [PlanChecker() for _ in range(1 if same_batch else repeat)]
    if same_batch:  # it passed this batch last step
        checkers[0].rules(plan, requests, tokens, [], running, budget, kv)
    times = []
    for _ in range(rounds):
        if not same_batch:
            for c in checkers:  # each a checker that has not seen this batch
                c._requests = c._running = None
        start = time.perf_counter()
        for i in range(repeat):
            checkers[i % len(checkers)].rules(plan, requests, tokens, [], running, budget, kv)
            check_sample(out, batch, VOCAB)
            if host is not None:
                check_token_ids(host, VOCAB)
        times.append((time.perf_counter() - start) / repeat * 1e6)
    return round(min(times), 2)


def contract_costs(device: str | torch.device | None = None) -> dict[str, float]:
    """`contract_check_us` for a few batch sizes, keyed `batch_<n>` (a batch that changed
    since the last step) and `batch_<n>_same_batch` (the steady state), with the sampler's
    tokens on `device` (default: CUDA where there is one, as the engine would have them)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = {}
    for n in (1, 32, 256):
        out[f"batch_{n}"] = contract_check_us(n, device)
        out[f"batch_{n}_same_batch"] = contract_check_us(n, device, same_batch=True)
    return out
