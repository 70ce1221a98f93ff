"""What checking plugins' results costs per engine step (`pegboard.core.contract`).

A decode step of `batch` running requests: `check_plan` on the scheduler's plan, `check_sample`
on the sampler's token tensor (on `device`: a CUDA tensor's ids are range-checked on the host
list, `check_token_ids`, a CPU tensor's with one `aminmax`). Best of 5 rounds: the
checks' own cost, not the noise of a shared machine.
"""

from __future__ import annotations

import time

import torch
from pegboard.core.contract import check_plan, check_sample, check_token_ids
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


def contract_check_us(batch: int, device: str | torch.device = "cpu", repeat: int = 200) -> float:
    """Microseconds the contract checks add to a decode step of `batch` requests."""
    running = []
    for i in range(batch):
        r = Request(list(range(1, 101)), request_id=f"r{i}")
        r.status, r.num_computed_tokens = RequestStatus.RUNNING, 100
        r.token_ids.append(7)  # one uncomputed token: a decode
        running.append(r)
    plan = SchedulePlan([ScheduledRequest(r, 1) for r in running])
    budget = StepBudget(8192, max(batch, 1), 4096)
    kv = _RoomyCache()
    tokens = torch.randint(0, VOCAB, (batch,), device=device)
    out = SampleOutput(tokens, [None] * batch)
    host = tokens.tolist() if tokens.device.type != "cpu" else None
    rounds = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(repeat):
            check_plan(plan, [], running, budget, kv)
            check_sample(out, batch, VOCAB)
            if host is not None:
                check_token_ids(host, VOCAB)
        rounds.append((time.perf_counter() - start) / repeat * 1e6)
    return round(min(rounds), 2)


def contract_costs(device: str | torch.device = "cpu") -> dict[str, float]:
    """`contract_check_us` for a few batch sizes, keyed `batch_<n>`."""
    return {f"batch_{n}": contract_check_us(n, device) for n in (1, 32, 256)}
