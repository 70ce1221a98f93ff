"""The plugin contract, checked: the engine guards its invariants against what plugins return.

A plugin is a guest. Every `SchedulePlan` a scheduler returns is checked against the rules of
the `schedule` hookspec, and every `SampleOutput` a sampler returns against those of `sample`,
before the engine uses them. A violation, like an exception raised by a plugin, becomes a
`PluginFault` whose message names the slot, the plugin, its distribution and the rule broken
(`scheduler 'lifo' (pegboard-lifo 0.1) broke the rule 'token budget': ...`), and is counted
per (slot, plugin) in `PluginGuard.errors` (`pegboard:plugin_errors_total`, `/admin/plugins`).

What a fault fails (the engine applies it; see the hookspecs):
- sampler: the requests of that `sample` call; the rest of the step goes on.
- kv_cache (`allocate_kv`): the requests scheduled in that step.
- scheduler: nothing at first — the step schedules no work and the engine retries. A scheduler
  that fails `SCHEDULER_FAILURE_LIMIT` steps in a row fails every queued request with its
  error (so a persistently broken scheduler neither spins nor hangs requests silently), then
  is tried again for requests that arrive later.
- metrics exporter: nothing; the error is logged (the first one with its traceback) and
  counted.

The checks need no device synchronisation: ids a sampler returns as a CUDA tensor are
range-checked when they reach the host (`check_token_ids`, one numpy reduction over the pinned
copy, one step later with overlap scheduling). A decode plan is checked without a per-request
Python pass (`PlanChecker`: a few whole-list C calls, or one list comparison when the batch
is the last step's); other plans get every rule in full. `bench offline` reports the cost per
step (`plugin_layer.contract_check_us`, `pegboard.core.bench.contract_cost`).
"""

from __future__ import annotations

import functools
import logging
import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from pegboard.core.sampling_table import SamplingTable
from pegboard.sdk.sampling import SampleRequests
from pegboard.sdk.types import RequestStatus, SampleOutput, SchedulePlan

if TYPE_CHECKING:
    from pegboard.core.plugin_manager import PluginManager
    from pegboard.sdk.slots import KVCache, Plugin
    from pegboard.sdk.types import Request, StepBudget

log = logging.getLogger("pegboard.contract")

#: Consecutive failing `schedule` calls after which the queued requests are failed.
SCHEDULER_FAILURE_LIMIT = 3

_INT_DTYPES = frozenset({torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8})
_WAITING, _RUNNING = RequestStatus.WAITING, RequestStatus.RUNNING


class ContractViolation(Exception):
    """A plugin's result broke a rule of its hook; `rule` is the rule's short name."""

    def __init__(self, rule: str, detail: str) -> None:
        super().__init__(f"broke the rule '{rule}': {detail}")
        self.rule = rule
        self.detail = detail


class PluginFault(Exception):
    """A plugin raised or broke its contract. The message names the plugin and its
    distribution (`scheduler 'lifo' (pegboard-lifo 0.1) raised ValueError: ...`)."""

    def __init__(self, slot: str, plugin: str, message: str, rule: str | None = None) -> None:
        super().__init__(message)
        self.slot = slot
        self.plugin = plugin
        self.rule = rule


# ------------------------------------------------------------------------------ the rules


class CheckedPlan(NamedTuple):
    """A plan that obeys the `schedule` hookspec, with its requests and token counts as lists
    (the engine runs the step from these; building them is not counted as checking)."""

    plan: SchedulePlan
    requests: list[Request]
    num_tokens: list[int]


def check_plan(
    plan: Any, waiting: list[Request], running: list[Request], budget: StepBudget, kv: KVCache
) -> SchedulePlan | None:
    """`plan` if it obeys the `schedule` hookspec, else raise `ContractViolation`."""
    checked = PlanChecker().check(plan, waiting, running, budget, kv)
    return checked.plan if checked is not None else None


class PlanChecker:
    """`check_plan` for one engine: it remembers the last decode plan it passed, so that the
    next step's, when it schedules the same requests against the same running queue (the
    steady state of decoding), needs no per-request pass at all.

    A decode plan (every request running, one token each, none preempted) is checked in a few
    whole-list C calls: `count(1)` and `sum` for the token counts, one list comparison with the
    last plan or else one `set` for 'scheduled twice' and 'unknown request', O(1) bounds for
    the budget and the pages. Any other plan gets every rule in full (`_check_plan`)."""

    def __init__(self) -> None:
        self._requests: list[Request] | None = None  # the last decode plan's requests ...
        self._running: list[Request] | None = None  # ... all in this running queue, once each

    def check(
        self, plan: Any, waiting: list[Request], running: list[Request], budget, kv
    ) -> CheckedPlan | None:
        if plan is None:
            return None
        if not isinstance(plan, SchedulePlan):
            raise ContractViolation(
                "plan type", f"returned {type(plan).__name__}, not a SchedulePlan"
            )
        try:
            requests = [s.request for s in plan.scheduled]
            tokens = [s.num_tokens for s in plan.scheduled]
            self.rules(plan, requests, tokens, waiting, running, budget, kv)
        except (AttributeError, TypeError) as e:
            raise ContractViolation("plan shape", f"malformed plan: {type(e).__name__}: {e}") from e
        return CheckedPlan(plan, requests, tokens)

    def rules(self, plan, requests, tokens, waiting, running, budget, kv) -> None:
        """Every rule of the `schedule` hookspec, on the plan's `requests` and `tokens`."""
        n = len(requests)
        if (
            n
            and not plan.preempted
            and tokens.count(1) == n  # each == 1 (a 1.0 or True too: `sum`'s type tells)
            and type(sum(tokens)) is int
            and self._all_running(requests, running)
        ):  # a decode step: no admission (request cap), nothing has too many tokens
            if n > budget.max_batched_tokens:
                raise ContractViolation(
                    "token budget",
                    f"the plan schedules {n} tokens, the budget is {budget.max_batched_tokens}",
                )
            if n // kv.page_size + n > kv.num_free_pages:  # else `_check_pages`' bound holds
                _check_pages(plan, kv, 0, n, n, [])
            return
        self._requests = self._running = None
        _check_plan(plan, requests, tokens, waiting, running, budget, kv)

    def _all_running(self, requests: list[Request], running: list[Request]) -> bool:
        """Whether `requests` are distinct members of `running` (else the full rules name the
        fault). One list comparison (by identity first, in C) when they are the running queue
        itself, in its order, or the last passing plan's requests against the same queue; a
        `set` otherwise."""
        if requests == running:  # the engine's queue holds each request once
            return True
        if requests == self._requests and running == self._running:
            return True
        unique = set(requests)  # requests hash by identity
        if len(unique) != len(requests) or not unique.issubset(running):
            return False
        self._requests, self._running = list(requests), list(running)  # copies: ours
        return True


def _check_plan(plan, requests, tokens, waiting, running, budget, kv) -> None:
    scheduled = plan.scheduled
    total = sum(tokens)
    if tokens and (type(total) is not int or min(tokens) < 1):
        s = next(s for s in scheduled if type(s.num_tokens) is not int or s.num_tokens < 1)
        raise ContractViolation(
            "zero tokens",
            f"{s.request.request_id!r} is scheduled with {s.num_tokens!r} tokens (at least 1)",
        )
    unique = set(requests)  # requests hash by identity
    if len(unique) != len(requests):
        seen: set[Request] = set()
        r = next(r for r in requests if r in seen or seen.add(r))
        raise ContractViolation("scheduled twice", f"{r.request_id!r} is scheduled twice")
    freed, num_preempted = _check_preempted(plan.preempted, unique)
    statuses = list(map(_status, requests))
    new = len(requests) - statuses.count(_RUNNING)
    admitted = []
    if new:  # an admission step: each non-running request must come from `waiting`
        queued = set(waiting)
        for s, status in zip(scheduled, statuses):
            if status is _RUNNING:
                continue
            if status is not _WAITING or s.request not in queued:
                raise ContractViolation(
                    "unknown request",
                    f"{s.request.request_id!r} is not in the waiting or running queue it was given",
                )
            admitted.append(s)
    # A running request always has at least one uncomputed token (its last sampled one), so a
    # pure decode plan (one token each, none new) cannot give too many: skip that pass.
    decode_only = not new and (not tokens or max(tokens) == 1)
    uncomputed = (
        []
        if decode_only
        else list(map(operator.sub, map(len, map(_token_ids, requests)), map(_computed, requests)))
    )
    if not decode_only and any(map(operator.gt, tokens, uncomputed)):
        s, left = next((s, u) for s, u in zip(scheduled, uncomputed) if s.num_tokens > u)
        raise ContractViolation(
            "too many tokens",
            f"{s.request.request_id!r} is given {s.num_tokens} tokens but has only {left} "
            "uncomputed",
        )
    if total > budget.max_batched_tokens:
        raise ContractViolation(
            "token budget",
            f"the plan schedules {total} tokens, the budget is {budget.max_batched_tokens}",
        )
    holders = len(running) - num_preempted + new
    if new and holders > budget.max_running_requests:
        raise ContractViolation(
            "request cap",
            f"{holders} requests would hold KV after the step, the cap is "
            f"{budget.max_running_requests}",
        )
    running_tokens = total - sum(s.num_tokens for s in admitted)
    _check_pages(plan, kv, freed, running_tokens, len(requests) - new, admitted)


_status = operator.attrgetter("status")


_token_ids = operator.attrgetter("token_ids")
_computed = operator.attrgetter("num_computed_tokens")


def _check_preempted(preempted: list[Request], scheduled: set[Request]) -> tuple[int, int]:
    """The preempted requests' pages and count; each must be running, listed once and not
    scheduled too."""
    if not preempted:
        return 0, 0
    out = set(preempted)
    if len(out) != len(preempted):
        raise ContractViolation("preempted twice", "a request is listed twice in `preempted`")
    both = out & scheduled
    if both:
        r = next(r for r in preempted if r in both)
        raise ContractViolation(
            "scheduled and preempted", f"{r.request_id!r} is both scheduled and preempted"
        )
    freed = 0
    for r in preempted:
        if r.status is not _RUNNING:
            raise ContractViolation(
                "unknown request", f"preempted {r.request_id!r}, which holds no KV (not running)"
            )
        freed += len(r.page_table)
    return freed, len(preempted)


def _check_pages(plan, kv, freed: int, running_tokens: int, num_running: int, admitted) -> None:
    """The scheduled requests' new pages fit in the free pages plus the preempted ones'.
    A running request needs at most ceil(n / page_size) new pages for n tokens, so the exact
    count (`kv.pages_needed`, a call per request) is only taken when that bound does not fit."""
    room = kv.num_free_pages + freed
    needed = sum(kv.pages_needed(s.request, s.num_tokens) for s in admitted)
    if running_tokens // kv.page_size + num_running + needed <= room:
        return
    needed += sum(
        kv.pages_needed(s.request, s.num_tokens)
        for s in plan.scheduled
        if s.request.status is _RUNNING
    )
    if needed > room:
        raise ContractViolation(
            "pages fit",
            f"the scheduled requests need {needed} new KV pages, only {room} are free "
            "(counting the preempted requests' pages)",
        )


def check_sample(out: Any, num_requests: int, vocab_size: int) -> SampleOutput:
    """`out` if it obeys the `sample` hookspec, else raise `ContractViolation`. Token ids in a
    device tensor are range-checked later, on the host (`check_token_ids`): checking them here
    would make the host wait for the device."""
    if not isinstance(out, SampleOutput):
        raise ContractViolation("output type", f"returned {type(out).__name__}, not a SampleOutput")
    tokens = out.tokens
    if tokens is not None:
        if not isinstance(tokens, torch.Tensor):
            raise ContractViolation("output type", f"token_ids is a {type(tokens).__name__}")
        if tokens.dtype not in _INT_DTYPES:
            raise ContractViolation(
                "integer dtype", f"token ids have dtype {tokens.dtype}, not an integer dtype"
            )
        if tokens.dim() != 1:
            raise ContractViolation(
                "shape", f"token ids have shape {list(tokens.shape)}, expected [{num_requests}]"
            )
        if tokens.shape[0] != num_requests:
            raise ContractViolation(
                "one token per request",
                f"returned {tokens.shape[0]} token ids for {num_requests} requests",
            )
        if tokens.device.type == "cpu" and num_requests:  # on the host: check now
            check_token_ids(tokens.numpy().astype(np.int64, copy=False), vocab_size)
    else:
        ids = out.token_ids
        if len(ids) != num_requests:
            raise ContractViolation(
                "one token per request",
                f"returned {len(ids)} token ids for {num_requests} requests",
            )
        if ids:
            if not set(map(type, ids)) <= {int}:
                kinds = sorted({type(i).__name__ for i in ids})
                raise ContractViolation(
                    "integer dtype", f"token ids are {', '.join(kinds)}, not int"
                )
            _check_range(min(ids), max(ids), vocab_size)
    if len(out.logprobs) != num_requests:
        raise ContractViolation(
            "one token per request",
            f"returned {len(out.logprobs)} logprobs entries for {num_requests} requests",
        )
    return out


def check_token_ids(ids: list[int] | np.ndarray, vocab_size: int) -> None:
    """Host-side range check of ids that came from a device tensor: a list, or an int64 array
    (one reduction: viewed as unsigned, a negative id is larger than any vocabulary)."""
    if isinstance(ids, np.ndarray):
        if ids.size and int(ids.view(np.uint64).max()) >= vocab_size:
            _check_range(int(ids.min()), int(ids.max()), vocab_size)
    elif ids:
        _check_range(min(ids), max(ids), vocab_size)


def _check_range(low: int, high: int, vocab_size: int) -> None:
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ContractViolation(
            "ids in vocabulary", f"token id {bad} is outside the vocabulary [0, {vocab_size})"
        )


# ------------------------------------------------------------------------------ the guard


class PluginGuard:
    """Calls the per-step hooks for the engine, checks what they return, turns exceptions and
    violations into `PluginFault`s naming the plugin, and counts them per (slot, plugin)."""

    def __init__(self, plugins: PluginManager) -> None:
        self.plugins = plugins
        #: (slot, plugin name) -> errors since start (exceptions and contract violations).
        self.errors: dict[tuple[str, str], int] = {}
        self.scheduler_failures = 0  # consecutive failing `schedule` calls
        self.plans = PlanChecker()
        #: The live requests' sampling parameters; the engine adds and removes requests.
        self.sampling = SamplingTable()

    def fault(self, slot: str, error: BaseException, plugin: Plugin | None = None) -> PluginFault:
        """Count `error` against the slot's active plugin (or `plugin`) and describe it."""
        plugin = plugin if plugin is not None else self.plugins.active(slot)
        name = plugin.name if plugin is not None else "?"
        key = (slot, name)
        self.errors[key] = self.errors.get(key, 0) + 1
        who = self.plugins.describe(plugin) if plugin is not None else f"{slot} (none active)"
        if isinstance(error, ContractViolation):
            return PluginFault(slot, name, f"{who} {error}", error.rule)
        return PluginFault(slot, name, f"{who} raised {type(error).__name__}: {error}")

    def call(self, slot: str, fn: Callable, **kwargs) -> Any:
        """`fn(**kwargs)`, with an exception turned into a `PluginFault` of `slot`."""
        try:
            return fn(**kwargs)
        except Exception as e:
            raise self.fault(slot, e) from e

    def schedule(self, hook: Callable, waiting, running, budget, kv) -> CheckedPlan | None:
        """The scheduler's plan, checked, with its requests and token counts as lists."""
        try:
            plan = hook(waiting=waiting, running=running, budget=budget, kv=kv)
            checked = self.plans.check(plan, waiting, running, budget, kv)
        except Exception as e:
            self.scheduler_failures += 1
            raise self.fault("scheduler", e) from e
        self.scheduler_failures = 0
        return checked

    @property
    def scheduler_stuck(self) -> bool:
        """Whether the scheduler failed `SCHEDULER_FAILURE_LIMIT` steps in a row."""
        return self.scheduler_failures >= SCHEDULER_FAILURE_LIMIT

    def sample(self, hook: Callable, logits: torch.Tensor, requests: list[Request], vocab: int):
        """The sampler's output, checked. Runs under `torch.inference_mode`, so the sampler may
        modify `logits` (an inference tensor) in place. The requests go in as a
        `SampleRequests` whose `sampling` is gathered from `self.sampling` (the engine's
        table of its requests' parameters)."""
        requests = SampleRequests(requests, functools.partial(self.sampling.batch, requests))
        if logits.dtype != torch.float32 and not self._model_dtype_sampler():
            logits = logits.float()  # the hookspec's float32, for samplers that did not opt out
        try:
            with torch.inference_mode():
                out = hook(logits=logits, requests=requests)
            return check_sample(out, len(requests), vocab)
        except Exception as e:
            raise self.fault("sampler", e) from e

    def _model_dtype_sampler(self) -> bool:
        """Whether the active sampler takes logits in the model's dtype
        (`pegboard.sdk.slots.Sampler.logits_in_model_dtype`)."""
        return bool(getattr(self.plugins.active("sampler"), "logits_in_model_dtype", False))

    def sampled_ids(self, ids: list[int], vocab: int) -> None:
        """Range-check ids that reached the host from the device (see `check_token_ids`)."""
        try:
            check_token_ids(ids, vocab)
        except ContractViolation as e:
            raise self.fault("sampler", e) from e

    def export(self, impls, snapshot) -> None:
        """Call each exporter on its own: one broken exporter must not starve the others."""
        for impl in impls:
            try:
                impl.function(snapshot=snapshot)
            except Exception as e:
                fault = self.fault("metrics", e, impl.plugin)
                if self.errors[("metrics", fault.plugin)] == 1:
                    log.exception("%s (counted; later errors are counted only)", fault)
                else:
                    log.debug("%s", fault)
