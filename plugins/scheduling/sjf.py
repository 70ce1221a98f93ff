"""Shortest job first, with aging so long jobs cannot starve."""

from __future__ import annotations

import itertools
import operator
from typing import Any, ClassVar

import pydantic
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.scheduling import PolicyOptions, PolicyScheduler
from pegboard.sdk.slots import KVCache
from pegboard.sdk.types import Request, SchedulePlan, StepBudget


class SJFOptions(PolicyOptions):
    """Options of `SJFScheduler`."""

    max_wait_steps: int = pydantic.Field(
        64,
        ge=0,
        description=(
            "Steps a request may be passed over (queued but not scheduled) before it is aged: "
            "aged requests go ahead of all others, in arrival order (0: plain FCFS)."
        ),
    )


class SJFScheduler(PolicyScheduler):
    """Shortest job first: requests are ordered by job size, `prompt tokens + max_tokens`,
    smallest first, ties in arrival order.

    Aging: every `schedule` call in which a request is waiting or running but not scheduled
    counts as one step *passed over* (kept in `request.plugin_state["sjf"]`, so it survives
    swaps). A request passed over `max_wait_steps` times is aged: it goes ahead of every
    request that is not, aged requests among themselves in arrival order. Admission blocks at
    the head of the queue, so once a request is aged no later-arriving request overtakes it:
    it is admitted as soon as a request slot and its pages are free, FCFS among the aged.
    """

    name = "sjf"
    Options: ClassVar[type[pydantic.BaseModel]] = SJFOptions

    def __init__(self, options: pydantic.BaseModel | None = None) -> None:
        super().__init__(options)
        #: (requests, their passed-over counts, their order) of the last two `_in_order` calls.
        self._orders: list[tuple[list[Request], list[int], list[Request]]] = []

    def sort_key(self, request: Request) -> Any:
        if self.steps_passed_over(request) >= self.options.max_wait_steps:
            return (0, request.seq)
        return (1, request.num_prompt_tokens + request.params.max_tokens, request.seq)

    def steps_passed_over(self, request: Request) -> int:
        return request.plugin_state.get(self.name, 0)

    @hookimpl
    def schedule(
        self, waiting: list[Request], running: list[Request], budget: StepBudget, kv: KVCache
    ) -> SchedulePlan:
        plan = super().schedule(waiting, running, budget, kv)
        chosen = set(map(id, map(_REQUEST, plan.scheduled)))
        queued = list(itertools.chain(waiting, running))
        unchosen = map(operator.not_, map(chosen.__contains__, map(id, queued)))
        for r in itertools.compress(queued, unchosen):
            r.plugin_state[self.name] = self.steps_passed_over(r) + 1
        return plan

    def _in_order(self, requests: list[Request]) -> list[Request]:
        """`sort_key`'s order with the keys built in whole-list C calls (unless a subclass
        changed `sort_key` or `steps_passed_over`): `(not aged, job size if not aged else 0,
        seq)` orders exactly as `(0, seq)` for aged and `(1, job size, seq)` for the others.
        The keys change only with the passed-over counts, so the order of the same requests
        with the same counts as in one of the last two calls (the running queue, the waiting
        queue) is taken from it."""
        cls = type(self)
        if (
            cls.sort_key is not SJFScheduler.sort_key
            or cls.steps_passed_over is not SJFScheduler.steps_passed_over
        ):
            return super()._in_order(requests)
        passed = list(map(operator.methodcaller("get", self.name, 0), map(_STATE, requests)))
        for known, known_passed, order in self._orders:
            if known == requests and known_passed == passed:
                return list(order)
        fresh = list(map(operator.lt, passed, itertools.repeat(self.options.max_wait_steps)))
        sizes = map(operator.add, map(len, map(_PROMPT, requests)), map(_MAX_TOKENS, requests))
        keys = list(zip(fresh, map(operator.mul, sizes, fresh), map(_SEQ, requests)))
        order = list(map(requests.__getitem__, sorted(range(len(keys)), key=keys.__getitem__)))
        self._orders = [(list(requests), passed, order), *self._orders[:1]]
        return list(order)


_REQUEST = operator.attrgetter("request")
_STATE = operator.attrgetter("plugin_state")
_PROMPT = operator.attrgetter("prompt_token_ids")
_MAX_TOKENS = operator.attrgetter("params.max_tokens")
_SEQ = operator.attrgetter("seq")
