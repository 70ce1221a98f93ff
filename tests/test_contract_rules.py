"""`pegboard.core.contract`'s rules one by one, on hand-made plans and outputs (the engine-level
behaviour is in test_plugin_contract.py)."""

from __future__ import annotations

import pytest
import torch
from pegboard.core.contract import (
    ContractViolation,
    PlanChecker,
    check_plan,
    check_sample,
    check_token_ids,
)
from pegboard.sdk.types import (
    Request,
    RequestStatus,
    SampleOutput,
    ScheduledRequest,
    SchedulePlan,
    StepBudget,
)

BUDGET = StepBudget(max_batched_tokens=32, max_running_requests=3, max_model_len=128)


class Cache:
    page_size = 4

    def __init__(self, free: int) -> None:
        self.num_free_pages = free

    def pages_needed(self, request, n):
        tokens = request.num_computed_tokens + n
        return max(-(-tokens // self.page_size) - len(request.page_table), 0)


def running(n_prompt: int = 8, pages: int = 2) -> Request:
    r = Request(list(range(1, n_prompt + 1)))
    r.status, r.num_computed_tokens = RequestStatus.RUNNING, n_prompt
    r.page_table = list(range(pages))
    r.token_ids.append(5)  # one token to compute: a decode
    return r


def rule(plan, waiting, run, free=100) -> str:
    with pytest.raises(ContractViolation) as e:
        check_plan(plan, waiting, run, BUDGET, Cache(free))
    return e.value.rule


def test_a_good_plan_passes_and_none_means_no_plan():
    a, b, w = running(), running(), Request([1, 2, 3])
    plan = SchedulePlan([ScheduledRequest(a, 1), ScheduledRequest(w, 3)], preempted=[b])
    assert check_plan(plan, [w], [a, b], BUDGET, Cache(1)) is plan  # b's 2 pages freed
    assert check_plan(None, [], [], BUDGET, Cache(0)) is None


def test_each_plan_rule_is_named():
    a, b, w = running(), running(), Request(list(range(40)))
    assert rule(["not", "a", "plan"], [], []) == "plan type"
    assert rule(SchedulePlan([ScheduledRequest(w, 33)]), [w], []) == "token budget"
    assert rule(SchedulePlan([ScheduledRequest(a, 2)]), [], [a]) == "too many tokens"
    assert rule(SchedulePlan([ScheduledRequest(a, 0)]), [], [a]) == "zero tokens"
    assert rule(SchedulePlan([ScheduledRequest(a, 1.0)]), [], [a]) == "zero tokens"
    assert rule(SchedulePlan([ScheduledRequest(a, 1)] * 2), [], [a]) == "scheduled twice"
    assert rule(SchedulePlan([ScheduledRequest(w, 3)]), [], []) == "unknown request"
    assert rule(SchedulePlan(preempted=[w]), [w], []) == "unknown request"
    assert rule(SchedulePlan(preempted=[a, a]), [], [a]) == "preempted twice"
    both = SchedulePlan([ScheduledRequest(a, 1)], preempted=[a])
    assert rule(both, [], [a]) == "scheduled and preempted"
    small = [Request([1]) for _ in range(2)]
    over_cap = SchedulePlan([ScheduledRequest(r, 1) for r in small])
    assert rule(over_cap, small, [a, b]) == "request cap"  # 2 running + 2 new > 3
    assert rule(SchedulePlan([ScheduledRequest(w, 12)]), [w], [], free=2) == "pages fit"
    assert rule(SchedulePlan([ScheduledRequest(object(), 1)]), [], []) == "plan shape"


def test_the_page_bound_falls_back_to_the_exact_count():
    # 3 decodes at a page boundary need 3 pages; the bound (3) fits exactly in 3 free pages.
    rs = [running(8, pages=2) for _ in range(3)]
    plan = SchedulePlan([ScheduledRequest(r, 1) for r in rs])
    assert check_plan(plan, [], rs, StepBudget(32, 8, 128), Cache(3)) is plan
    assert rule(plan, [], rs, free=2) == "pages fit"
    # Mid-page decodes need no page at all: the exact count accepts them with none free.
    mid = [running(6, pages=2) for _ in range(3)]
    plan = SchedulePlan([ScheduledRequest(r, 1) for r in mid])
    assert check_plan(plan, [], mid, StepBudget(32, 8, 128), Cache(0)) is plan


def test_each_sample_rule_is_named():
    def sample_rule(out, n=2, vocab=10) -> str:
        with pytest.raises(ContractViolation) as e:
            check_sample(out, n, vocab)
        return e.value.rule

    ok = check_sample(SampleOutput(torch.tensor([1, 9]), [None, None]), 2, 10)
    assert ok.token_ids == [1, 9]
    assert sample_rule(None) == "output type"
    assert sample_rule(SampleOutput(torch.tensor([1]), [None, None])) == "one token per request"
    assert sample_rule(SampleOutput([1, 2, 3], [None] * 3)) == "one token per request"
    assert sample_rule(SampleOutput(torch.tensor([1, 2]), [None])) == "one token per request"
    assert sample_rule(SampleOutput(torch.tensor([1.0, 2.0]), [None] * 2)) == "integer dtype"
    assert sample_rule(SampleOutput([1.0, 2], [None] * 2)) == "integer dtype"
    assert sample_rule(SampleOutput(torch.tensor([[1], [2]]), [None] * 2)) == "shape"
    assert sample_rule(SampleOutput(torch.tensor([1, 10]), [None] * 2)) == "ids in vocabulary"
    assert sample_rule(SampleOutput([-1, 2], [None] * 2)) == "ids in vocabulary"
    with pytest.raises(ContractViolation, match="token id 12 is outside the vocabulary"):
        check_token_ids([3, 12], 10)


def test_a_decode_plan_is_checked_in_full_even_when_the_checker_remembers_the_last_one():
    # `PlanChecker` skips the per-request pass for the batch it passed last step, against the
    # same running queue: every rule must still hold when either changed.
    rs = [running() for _ in range(3)]
    checker = PlanChecker()

    def decode_rule(plan, run, budget=BUDGET, free=100) -> str:
        with pytest.raises(ContractViolation) as e:
            checker.check(plan, [], run, budget, Cache(free))
        return e.value.rule

    ok = SchedulePlan([ScheduledRequest(r, 1) for r in reversed(rs)])  # not the queue's order
    for _ in range(2):  # the second time from memory
        assert checker.check(ok, [], rs, BUDGET, Cache(100)).requests == rs[::-1]
    done, *rest = rs
    done.status = RequestStatus.FINISHED  # it left the running queue; the plan still has it
    assert decode_rule(ok, rest) == "unknown request"
    twice = SchedulePlan([ScheduledRequest(r, 1) for r in rest + rest[:1]])
    assert decode_rule(twice, rest) == "scheduled twice"
    floats = SchedulePlan([ScheduledRequest(rest[0], 1), ScheduledRequest(rest[1], 1.0)])
    assert decode_rule(floats, rest) == "zero tokens"
    same = SchedulePlan([ScheduledRequest(r, 1) for r in rest])
    assert checker.check(same, [], rest, BUDGET, Cache(100)).num_tokens == [1, 1]
    assert decode_rule(same, rest, budget=StepBudget(1, 3, 128)) == "token budget"
    full = [running(8, pages=2) for _ in range(2)]  # at a page boundary: a page each
    assert decode_rule(SchedulePlan([ScheduledRequest(r, 1) for r in full]), full, free=1) == (
        "pages fit"
    )
    stranger = running()  # running, but not in the queue the plan was made from
    plan = SchedulePlan([ScheduledRequest(r, 1) for r in rest + [stranger]])
    assert checker.check(plan, [], rest + [stranger], BUDGET, Cache(100)) is not None
    stranger.status = RequestStatus.WAITING  # a waiting request given one token, not admitted
    assert decode_rule(plan, rest) == "unknown request"
