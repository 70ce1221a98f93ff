"""`PolicyScheduler`: the scheduling algorithm every built-in policy shares.

A policy is a subclass that overrides a few small methods (its *contract*, below); the
algorithm — token budget, chunked prefill, KV fit, preemption, admission — is written once here.

One step (vLLM v1 / SGLang style):

1. **Running requests**, in `sort_key` order, each get `min(uncomputed tokens, tokens left)`
   tokens (a decode gets 1, a request in the middle of its prefill gets its next chunk). If the
   KV cache cannot hold the pages this needs, running requests not yet scheduled this step are
   preempted — the one with the largest `victim_key` first, possibly the request itself — until
   it fits. A preempted request's pages count as free for the rest of the step.
2. **Waiting requests**, in `sort_key` order, unless step 1 preempted anything. A waiting
   request starts at its cached prefix (`kv.match_prefix`) and gets
   `min(tokens after the prefix, tokens left)` tokens: a long prompt is prefilled in chunks over
   several steps. It is admitted if a request slot is left (`max_running_requests`), the KV
   cache holds its pages, and the conservativeness rule below holds. If it is not admitted, the
   policy may name running requests to preempt for it (`admission_victims`); otherwise it blocks
   every request after it when `head_of_line_blocking` is set, or is skipped.

**Conservativeness** (`Options.conservativeness`, c >= 0, as SGLang's
`--schedule-conservativeness`): a waiting request is admitted only if, after its admission,
the free KV pages are at least c x the pages that the requests holding KV (including itself)
still need to reach their final length `min(prompt tokens + max_tokens, max_model_len) - 1`.
c = 0 disables the rule; c = 1 admits only what can run to completion without preemption
(when requests use their whole `max_tokens`); values in between trade decode smoothness for
batch size. The rule is waived when no request would otherwise hold KV, so a request larger
than the rule allows still runs alone.

No request is ever given tokens past `budget.max_model_len`.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pydantic
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.slots import KVCache, Plugin, PluginContext, Scheduler
from pegboard.sdk.types import Request, ScheduledRequest, SchedulePlan, StepBudget


class PolicyOptions(pydantic.BaseModel):
    """Options of every `PolicyScheduler`; a policy's own `Options` subclasses this model."""

    model_config = pydantic.ConfigDict(extra="forbid")

    conservativeness: float = pydantic.Field(
        0.0,
        ge=0.0,
        description=(
            "Admit a request only if afterwards free KV pages >= this x the pages running "
            "requests still need to finish (0: off; 1: no admission that could force a "
            "preemption). Defaults to the engine's schedule_conservativeness."
        ),
    )


@dataclass
class _Step:
    """The plan being built in one `schedule` call and the resources it has left."""

    budget: StepBudget
    tokens_left: int
    free_pages: int  # free now + pages of requests preempted this step - pages promised
    holders: int  # requests that will hold KV after the step
    plan: SchedulePlan = field(default_factory=SchedulePlan)
    promised: dict[int, int] = field(default_factory=dict)  # id(request) -> pages this step
    reserve: dict[int, int] = field(default_factory=dict)  # id(request) -> pages still to come
    reserved: int = 0  # sum of `reserve`, kept so admission checks stay O(1)
    preempted: set[int] = field(default_factory=set)
    admits_next: bool = True  # waiting requests may be admitted after the running ones

    def add(self, request: Request, num_tokens: int, pages: int) -> None:
        self.plan.scheduled.append(ScheduledRequest(request, num_tokens))
        self.tokens_left -= num_tokens
        if pages:
            self.free_pages -= pages
            self.promised[id(request)] = pages

    def preempt(self, request: Request) -> None:
        """Preempt a running request, taking back what this step already gave it."""
        for i, s in enumerate(self.plan.scheduled):
            if s.request is request:
                del self.plan.scheduled[i]
                self.tokens_left += s.num_tokens
                break
        self.free_pages += self.promised.pop(id(request), 0) + len(request.page_table)
        self.reserved -= self.reserve.pop(id(request), 0)
        self.holders -= 1
        self.preempted.add(id(request))
        self.plan.preempted.append(request)

    def reserve_for(self, request: Request, pages: int) -> None:
        self.reserve[id(request)] = pages
        self.reserved += pages

    def is_out(self, request: Request) -> bool:
        return id(request) in self.preempted


class PolicyScheduler(Scheduler):
    """A scheduling policy on the shared algorithm described in this module's docstring.

    Subclass it and override what your policy changes (the contract):

    - `sort_key(request)` — the order in which requests are considered, smallest first, for
      the running and the waiting queue alike. Default: arrival order, `(request.seq,)`.
    - `victim_key(request)` — which running request to preempt when KV runs out: the largest
      key goes first. Default: least important, then most recently arrived,
      `(request.priority, request.seq)`.
    - `admission_victims(request, running)` — running requests that may be preempted so that a
      waiting `request` that does not fit can be admitted, in the order to preempt them; they
      are preempted only if enough of them free the room it needs. Default: none.
    - `head_of_line_blocking` (class attribute) — True: a waiting request that cannot be
      admitted blocks the ones after it (no reordering around it); False: they are tried.
    - `Options` — a subclass of `PolicyOptions` with the policy's own knobs.

    A policy that keeps per-request data stores it in `request.plugin_state[self.name]` so it
    survives a scheduler swap. A policy may also override `schedule` to update such data
    around `super().schedule(...)`.
    """

    Options: ClassVar[type[pydantic.BaseModel]] = PolicyOptions
    head_of_line_blocking: ClassVar[bool] = True

    def __init__(self, options: pydantic.BaseModel | None = None) -> None:
        super().__init__(options)
        #: The last decode step's order and its `ScheduledRequest(r, 1)` objects, reused.
        self._decode_last: tuple[list[Request], list[ScheduledRequest]] = ([], [])

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        engine_value = ctx.engine.get("schedule_conservativeness")
        if engine_value and "conservativeness" not in self.options.model_fields_set:
            self.options = self.options.model_copy(update={"conservativeness": engine_value})

    # ------------------------------------------------------------------ the policy contract

    def sort_key(self, request: Request) -> Any:
        return (request.seq,)

    def victim_key(self, request: Request) -> Any:
        return (request.priority, request.seq)

    def admission_victims(self, request: Request, running: Sequence[Request]) -> list[Request]:
        return []

    # ------------------------------------------------------------------ the algorithm

    @hookimpl
    def schedule(
        self, waiting: list[Request], running: list[Request], budget: StepBudget, kv: KVCache
    ) -> SchedulePlan:
        step = _Step(budget, budget.max_batched_tokens, kv.num_free_pages, len(running))
        step.admits_next = bool(waiting) and (
            len(running) < budget.max_running_requests or self._preempts_for_admission()
        )
        self._schedule_running(self._in_order(running), step, kv)
        if not step.plan.preempted:
            self._admit_waiting(self._in_order(waiting), running, step, kv)
        return step.plan

    def _in_order(self, requests: list[Request]) -> list[Request]:
        """`requests` sorted by `sort_key` (a policy may compute the same order faster)."""
        return sorted(requests, key=self._order_key())

    def _order_key(self):
        """`sort_key`, or the same order computed in C when the policy keeps the default."""
        return _BY_SEQ if type(self).sort_key is PolicyScheduler.sort_key else self.sort_key

    def _preempts_for_admission(self) -> bool:
        """Whether `admission_victims` may name victims (it is not the default's `[]`): with
        every request slot taken, only then can a waiting request be admitted."""
        return type(self).admission_victims is not PolicyScheduler.admission_victims

    def _schedule_running(self, order: list[Request], step: _Step, kv: KVCache) -> None:
        if self._schedule_decode(order, step, kv):
            return
        self._decode_last = ([], [])
        # The loop at a few hundred running requests, a decode token each: `_chunk` and
        # `_Step.add` inlined, `step`'s counters kept in locals except around a preemption.
        out, max_len, pages_needed = step.preempted, step.budget.max_model_len, kv.pages_needed
        scheduled, promised = step.plan.scheduled, step.promised
        left, free = step.tokens_left, step.free_pages
        for i, r in enumerate(order):
            if left == 0:
                break
            if out and id(r) in out:
                continue
            start = r.num_computed_tokens
            n = min(len(r.token_ids) - start, left, max_len - start)
            if n <= 0:
                continue
            pages = pages_needed(r, n)
            if pages > free:  # preempt (possibly `r` itself) until it fits
                step.tokens_left, step.free_pages = left, free
                while pages > step.free_pages and id(r) not in out:
                    candidates = [q for q in order[i:] if id(q) not in out]
                    step.preempt(max(candidates, key=self.victim_key))
                left, free = step.tokens_left, step.free_pages
                if id(r) in out:
                    continue
            scheduled.append(ScheduledRequest(r, n))
            left -= n
            if pages:
                free -= pages
                promised[id(r)] = pages
        step.tokens_left, step.free_pages = left, free

    def _schedule_decode(self, order: list[Request], step: _Step, kv: KVCache) -> bool:
        """Step 1 for the steady state of decoding, in whole-list passes: when every running
        request has exactly one uncomputed token and they all fit (tokens, context length, KV
        pages), each gets its token, in order, and nothing is preempted — what the loop would
        decide, without a Python pass per request. False (nothing done): not that case.

        Pages: a running request's next token needs at most one new page (the bound the
        engine's plan check relies on too), so `len(order)` free pages are enough. The exact
        counts are taken (a `pages_needed` call each) only when waiting requests may be
        admitted after this, since admission reads the free pages left and the pages promised.
        """
        n = len(order)
        if not n or step.tokens_left < n:
            return False
        starts = [r.num_computed_tokens for r in order]  # (faster than `map(attrgetter)`)
        if max(starts) >= step.budget.max_model_len:
            return False
        if [len(r.token_ids) - s for r, s in zip(order, starts)].count(1) != n:
            return False
        if step.admits_next:
            pages = list(map(kv.pages_needed, order, itertools.repeat(1)))
            total = sum(pages)
            if total > step.free_pages:
                return False
            step.free_pages -= total
            step.promised.update(
                zip(map(id, itertools.compress(order, pages)), filter(None, pages))
            )
        elif n > step.free_pages:
            return False
        step.plan.scheduled = self._decode_plan(order)
        step.tokens_left -= n
        return True

    def _decode_plan(self, order: list[Request]) -> list[ScheduledRequest]:
        """`ScheduledRequest(r, 1)` for each request, reusing the last decode step's objects
        instead of constructing a few hundred dataclasses every step: the whole list when the
        order is the same (one list comparison), else one dict lookup each (in C)."""
        last_order, last_items = self._decode_last
        if order == last_order:
            items = list(last_items)
        else:
            known = dict(zip(map(id, last_order), last_items))
            items = list(map(known.get, map(id, order)))
            if not all(items) or [s.request for s in items] != order:  # `all`: no __eq__ calls
                items = [
                    s if s is not None and s.request is r else ScheduledRequest(r, 1)
                    for s, r in zip(items, order)
                ]
        if [s.num_tokens for s in items].count(1) != len(items):  # a plugin changed one
            items = [ScheduledRequest(r, 1) for r in order]
        self._decode_last = (order, items)
        return list(items)

    def _admit_waiting(
        self, order: list[Request], running: list[Request], step: _Step, kv: KVCache
    ) -> None:
        if not order:
            return
        c = self.options.conservativeness
        if c > 0:
            for q in running:
                step.reserve_for(q, _pages_to_finish(q, q.num_computed_tokens, step, kv))
        for r in order:
            if step.tokens_left == 0:
                break
            hit = kv.match_prefix(r)
            n = _chunk(r, hit, step)
            if n == 0:
                continue
            pages = kv.pages_needed(r, n)
            future = _pages_to_finish(r, hit, step, kv) - pages if c > 0 else 0
            victims = self._room_for(r, pages, future, running, step)
            if victims is None:
                if self.head_of_line_blocking:
                    break
                continue
            for v in victims:
                step.preempt(v)
            step.add(r, n, pages)
            step.holders += 1
            if c > 0:
                step.reserve_for(r, future)

    def _room_for(
        self, r: Request, pages: int, future: int, running: list[Request], step: _Step
    ) -> list[Request] | None:
        """The running requests to preempt so `r` can be admitted ([] if it fits as is), or
        None if it cannot be admitted this step."""
        free, holders, reserve = step.free_pages, step.holders, step.reserved
        if self._admits(pages, future, free, holders, reserve, step.budget):
            return []
        live = [q for q in running if not step.is_out(q)]
        victims = []
        for v in self.admission_victims(r, live):
            victims.append(v)
            free += step.promised.get(id(v), 0) + len(v.page_table)
            holders -= 1
            reserve -= step.reserve.get(id(v), 0)
            if self._admits(pages, future, free, holders, reserve, step.budget):
                return victims
        return None

    def _admits(
        self, pages: int, future: int, free: int, holders: int, reserve: int, budget: StepBudget
    ) -> bool:
        if holders >= budget.max_running_requests or pages > free:
            return False
        if holders == 0:
            return True  # conservativeness is waived: a request must be able to run alone
        return free - pages >= self.options.conservativeness * (reserve + future)


_BY_SEQ = operator.attrgetter("seq")  # the default `sort_key`'s order


def _chunk(r: Request, start: int, step: _Step) -> int:
    """Tokens `r` may compute this step from token `start` on."""
    return max(min(r.num_tokens - start, step.tokens_left, step.budget.max_model_len - start), 0)


def _pages_to_finish(r: Request, start: int, step: _Step, kv: KVCache) -> int:
    """Pages `r` needs from token `start` until its final length, minus those promised now."""
    final = min(r.num_prompt_tokens + r.params.max_tokens, step.budget.max_model_len) - 1
    return kv.pages_needed(r, max(final - start, 0)) - step.promised.get(id(r), 0)
