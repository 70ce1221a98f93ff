"""Priority scheduling: more important requests first, preempting less important ones."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import Any, ClassVar

import pydantic
from pegboard.sdk.scheduling import PolicyOptions, PolicyScheduler
from pegboard.sdk.types import Request


class PriorityOptions(PolicyOptions):
    """Options of `PriorityScheduler`."""

    preempt_for_priority: bool = pydantic.Field(
        True,
        description=(
            "Preempt running requests of strictly lower importance when a more important "
            "waiting request cannot be admitted (KV pages or the running-request cap)."
        ),
    )


class PriorityScheduler(PolicyScheduler):
    """Requests run by `request.priority` (lower value = more important), FCFS within a level.

    When a waiting request cannot be admitted — the KV cache lacks its pages or
    `max_running_requests` is reached — running requests of *strictly* lower importance
    (larger `priority` value) are preempted for it, the least important first and, within a
    level, the most recently arrived first, but only if preempting them makes enough room;
    the request is then admitted in the same step. Requests of equal or higher importance are
    never preempted for it. Admission blocks at the head of the queue, so a less important
    request never overtakes a more important one that is waiting. Under KV pressure among
    running requests, the least important, most recent one is preempted first.
    """

    name = "priority"
    Options: ClassVar[type[pydantic.BaseModel]] = PriorityOptions

    def sort_key(self, request: Request) -> Any:
        return (request.priority, request.seq)

    def admission_victims(self, request: Request, running: Sequence[Request]) -> list[Request]:
        if not self.options.preempt_for_priority:
            return []
        less = map(operator.gt, map(_PRIORITY, running), itertools.repeat(request.priority))
        less_important = list(itertools.compress(running, less))
        key = (
            _BY_PRIORITY if type(self).victim_key is PolicyScheduler.victim_key else self.victim_key
        )
        return sorted(less_important, key=key, reverse=True)

    def _order_key(self):
        """`sort_key`'s order in C (an attrgetter's tuple) unless a subclass changed it."""
        if type(self).sort_key is PriorityScheduler.sort_key:
            return _BY_PRIORITY
        return self.sort_key


_PRIORITY = operator.attrgetter("priority")
_BY_PRIORITY = operator.attrgetter("priority", "seq")  # (request.priority, request.seq)
