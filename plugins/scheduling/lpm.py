"""Longest prefix match first: cache-aware scheduling for a prefix cache (SGLang's LPM)."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import pydantic
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.scheduling import PolicyOptions, PolicyScheduler
from pegboard.sdk.slots import KVCache
from pegboard.sdk.types import Request, RequestStatus, SchedulePlan, StepBudget


class LPMOptions(PolicyOptions):
    """Options of `LPMScheduler`."""

    fcfs_threshold: int = pydantic.Field(
        128,
        ge=0,
        description=(
            "With more waiting requests than this, skip prefix matching and schedule "
            "first come, first served (matching every request each step costs CPU time)."
        ),
    )
    max_wait_steps: int = pydantic.Field(
        64,
        ge=0,
        description=(
            "Starvation guard: a waiting request passed over this many steps goes ahead of "
            "all others, in arrival order, and is never deferred (0: every request is aged "
            "at once, i.e. FCFS)."
        ),
    )
    in_batch_prefix_tokens: int = pydantic.Field(
        32,
        ge=0,
        description=(
            "Defer a waiting request whose first this-many tokens are not cached but equal "
            "those of a waiting request ahead of it: that one computes the prefix and the "
            "deferred one hits it a step later (0: off)."
        ),
    )


class LPMScheduler(PolicyScheduler):
    """Waiting requests are ordered by the length of their cached prefix
    (`kv.match_prefix`), longest first, ties in arrival order; running requests keep arrival
    order. Requests that share a prefix run back to back, while it is still cached.

    - **FCFS fallback**: with more than `fcfs_threshold` waiting requests no prefix is matched
      and the order is arrival order (as SGLang does above 128).
    - **In-batch prefix sharing**: a waiting request whose first `in_batch_prefix_tokens`
      tokens are not cached and equal those of a request ahead of it in this step's order is
      deferred, so the shared prefix is computed once and hit afterwards.
    - **Starvation guard** (deterministic, counted in steps): every `schedule` call in which a
      waiting request is not scheduled counts as one step passed over
      (`request.plugin_state["lpm"]`, which survives swaps). After `max_wait_steps` the request
      is aged: aged requests go ahead of all others in arrival order and are never deferred;
      admission blocks at the head of the queue, so nothing overtakes an aged request.
    """

    name = "lpm"
    Options: ClassVar[type[pydantic.BaseModel]] = LPMOptions

    def __init__(self, options: pydantic.BaseModel | None = None) -> None:
        super().__init__(options)
        self._hits: dict[int, int] = {}

    def steps_passed_over(self, request: Request) -> int:
        return request.plugin_state.get(self.name, 0)

    def is_aged(self, request: Request) -> bool:
        return self.steps_passed_over(request) >= self.options.max_wait_steps

    def sort_key(self, request: Request) -> Any:
        if request.status is RequestStatus.RUNNING or self.is_aged(request):
            return (0, 0, request.seq)
        return (1, -self._hits.get(id(request), 0), request.seq)

    def _in_order(self, requests: list[Request]) -> list[Request]:
        """Running requests (keyed `(0, 0, seq)`) in arrival order by a C sort, unless a
        subclass changed `sort_key`; anything else by `sort_key`."""
        running = list(map(_STATUS, requests)).count(RequestStatus.RUNNING) == len(requests)
        if running and type(self).sort_key is LPMScheduler.sort_key:
            return sorted(requests, key=_SEQ)
        return super()._in_order(requests)

    @hookimpl
    def schedule(
        self, waiting: list[Request], running: list[Request], budget: StepBudget, kv: KVCache
    ) -> SchedulePlan:
        candidates = waiting
        if len(waiting) <= self.options.fcfs_threshold:
            self._hits = {id(r): kv.match_prefix(r) for r in waiting}
            candidates = self._defer_shared(sorted(waiting, key=self.sort_key))
        try:
            plan = super().schedule(candidates, running, budget, kv)
        finally:
            self._hits = {}
        chosen = {id(s.request) for s in plan.scheduled}
        for r in waiting:
            if id(r) not in chosen:
                r.plugin_state[self.name] = self.steps_passed_over(r) + 1
        return plan

    def _defer_shared(self, order: Sequence[Request]) -> list[Request]:
        """`order` without the requests whose uncached leading tokens a request ahead of them
        will compute this step."""
        t = self.options.in_batch_prefix_tokens
        if t == 0:
            return list(order)
        ahead: set[tuple[int, ...]] = set()
        kept = []
        for r in order:
            if self._hits[id(r)] < t and r.num_tokens > t:
                key = tuple(r.token_ids[:t])
                if key in ahead and not self.is_aged(r):
                    continue
                ahead.add(key)
            kept.append(r)
        return kept


_STATUS = operator.attrgetter("status")
_SEQ = operator.attrgetter("seq")
