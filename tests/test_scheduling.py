"""Scheduling policies on the shared PolicyScheduler algorithm, driven with the paged cache by a
model-free engine loop that follows the engine's step protocol."""

from __future__ import annotations

from collections.abc import Iterable

import pluggy
import pydantic
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pegboard.core import hookspecs
from pegboard.plugins.cache.paged import PagedCache
from pegboard.plugins.scheduling.fcfs import FCFSScheduler
from pegboard.plugins.scheduling.lpm import LPMScheduler
from pegboard.plugins.scheduling.priority import PriorityScheduler
from pegboard.plugins.scheduling.sjf import SJFScheduler
from pegboard.sdk.scheduling import PolicyScheduler
from pegboard.sdk.slots import PluginContext
from pegboard.sdk.types import (
    ModelInfo,
    Request,
    RequestStatus,
    SamplingParams,
    SchedulePlan,
    StepBudget,
)

SAMPLED_TOKEN = 7


def model_info() -> ModelInfo:
    return ModelInfo("tiny", 1, 1, 1, 4, 4, 32, 4096, torch.float32, torch.device("cpu"))


def paged_cache(num_pages: int = 256, page_size: int = 4) -> PagedCache:
    cache = PagedCache()
    engine = {"page_size": page_size, "kv_cache_tokens": num_pages * page_size}
    cache.setup(PluginContext(model_info(), engine=engine))
    return cache


def req(rid: str, prompt_len: int, max_tokens: int, priority: int = 0) -> Request:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Request([1] * prompt_len, params, request_id=rid, priority=priority)


class SimEngine:
    """The engine's step protocol (schedule, preempt, allocate_kv, admit, forward, sample,
    commit, free finished) without a model; it checks every plan against the budget and the
    cache's invariants after every step, and logs what each step admitted and scheduled."""

    def __init__(
        self,
        scheduler: PolicyScheduler,
        cache: PagedCache,
        max_batched_tokens: int = 64,
        max_running: int = 64,
        max_model_len: int = 4096,
    ) -> None:
        self.scheduler, self.cache = scheduler, cache
        self.budget = StepBudget(max_batched_tokens, max_running, max_model_len)
        self.waiting: list[Request] = []
        self.running: list[Request] = []
        self.admitted: list[list[str]] = []  # per step, request ids in admission order
        self.scheduled: list[dict[str, int]] = []  # per step, request id -> tokens
        self.preempted: list[list[str]] = []  # per step

    def add(self, *requests: Request) -> None:
        self.waiting.extend(requests)

    def step(self) -> SchedulePlan:
        plan = self.scheduler.schedule(
            waiting=list(self.waiting),
            running=list(self.running),
            budget=self.budget,
            kv=self.cache,
        )
        self._check(plan)
        for r in reversed(plan.preempted):
            self.cache.free(r)
            self.running.remove(r)
            r.num_computed_tokens, r.status = 0, RequestStatus.WAITING
            r.num_preemptions += 1
            self.waiting.insert(0, r)
        requests = [s.request for s in plan.scheduled]
        failed = self.cache.allocate_kv(requests, [s.num_tokens for s in plan.scheduled])
        assert failed == [], "the plan promised pages the cache does not have"
        admitted = []
        for r in requests:
            if r.status is RequestStatus.WAITING:
                self.waiting.remove(r)
                self.running.append(r)
                r.status = RequestStatus.RUNNING
                admitted.append(r.request_id)
        for s in plan.scheduled:
            r = s.request
            r.num_computed_tokens += s.num_tokens
            if r.num_computed_tokens == r.num_tokens:
                r.append_token(SAMPLED_TOKEN)
                if r.num_output_tokens >= r.params.max_tokens or (
                    r.num_tokens >= self.budget.max_model_len
                ):
                    r.status = RequestStatus.FINISHED
        self.cache.commit(requests)
        for r in [r for r in requests if r.finished]:
            self.cache.free(r)
            self.running.remove(r)
        self.cache.check_invariants(self.running + self.waiting)
        self.admitted.append(admitted)
        self.scheduled.append({s.request.request_id: s.num_tokens for s in plan.scheduled})
        self.preempted.append([r.request_id for r in plan.preempted])
        return plan

    def run(self, arrivals: dict[int, Iterable[Request]] | None = None, max_steps: int = 500):
        """Step until every request finished; `arrivals[k]` are added before step k."""
        arrivals = arrivals or {}
        last_arrival = max(arrivals, default=0)
        for k in range(max_steps):
            self.add(*arrivals.get(k, ()))
            if k >= last_arrival and not (self.waiting or self.running):
                return
            self.step()
        raise AssertionError(f"not done after {max_steps} steps")

    def admission_steps(self) -> dict[int, list[str]]:
        return {k: ids for k, ids in enumerate(self.admitted) if ids}

    def admission_step_of(self, rid: str) -> int:
        return next(k for k, ids in enumerate(self.admitted) if rid in ids)

    def _check(self, plan: SchedulePlan) -> None:
        ids = [id(s.request) for s in plan.scheduled]
        assert len(ids) == len(set(ids)), "a request is scheduled twice"
        assert not set(ids) & {id(r) for r in plan.preempted}, "scheduled and preempted"
        assert all(r in self.running for r in plan.preempted), "only running requests preempt"
        assert plan.num_tokens <= self.budget.max_batched_tokens
        new = [s.request for s in plan.scheduled if s.request.status is RequestStatus.WAITING]
        holders = len(self.running) - len(plan.preempted) + len(new)
        assert holders <= self.budget.max_running_requests
        for s in plan.scheduled:
            assert 1 <= s.num_tokens <= s.request.num_uncomputed_tokens
            assert s.request.num_computed_tokens + s.num_tokens <= self.budget.max_model_len


def five_requests() -> list[Request]:
    """Job sizes (prompt + max_tokens): A 14, B 10, C 5, D 12, E 7; priorities 2 1 0 2 0."""
    return [
        req("A", 8, 6, priority=2),
        req("B", 8, 2, priority=1),
        req("C", 4, 1, priority=0),
        req("D", 4, 8, priority=2),
        req("E", 4, 3, priority=0),
    ]


# ---------------------------------------------------------------------- policy order


def test_fcfs_admits_in_arrival_order_two_at_a_time():
    sim = SimEngine(FCFSScheduler(), paged_cache(), max_running=2)
    sim.run({0: five_requests()})
    # A runs steps 0-5, B 0-1, C 2, D 3-10, E 6-8: each admission waits for a free slot.
    assert sim.admission_steps() == {0: ["A", "B"], 2: ["C"], 3: ["D"], 6: ["E"]}


def test_sjf_admits_shortest_jobs_first():
    sim = SimEngine(SJFScheduler(), paged_cache(), max_running=2)
    sim.run({0: five_requests()})
    # C (5) and E (7) first; B (10) when C is done; then D (12) before A (14).
    assert sim.admission_steps() == {0: ["C", "E"], 1: ["B"], 3: ["D", "A"]}


def test_priority_admits_most_important_first_fcfs_within_a_level():
    sim = SimEngine(PriorityScheduler(), paged_cache(), max_running=2)
    sim.run({0: five_requests()})
    assert sim.admission_steps() == {0: ["C", "E"], 1: ["B"], 3: ["A", "D"]}
    assert not any(sim.preempted)


def test_running_requests_get_one_token_each_in_policy_order():
    sim = SimEngine(FCFSScheduler(), paged_cache(), max_running=2)
    sim.add(*five_requests())
    sim.step()
    plan = sim.step()
    assert [(s.request.request_id, s.num_tokens) for s in plan.scheduled] == [("A", 1), ("B", 1)]


def test_hooks_answer_through_pluggy():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    cache = paged_cache()
    pm.register(FCFSScheduler())
    pm.register(cache)
    r = req("A", 5, 2)
    plan = pm.hook.schedule(waiting=[r], running=[], budget=StepBudget(64, 4, 4096), kv=cache)
    assert [(s.request, s.num_tokens) for s in plan.scheduled] == [(r, 5)]
    assert pm.hook.allocate_kv(scheduled=[r], num_tokens=[5]) == []
    assert len(r.page_table) == 2


# ---------------------------------------------------------------------- SJF aging


def short_stream(steps: int) -> dict[int, list[Request]]:
    return {k: [req(f"s{k}", 2, 1)] for k in range(steps)}


@pytest.mark.parametrize("max_wait_steps", [0, 3, 5])
def test_sjf_aging_admits_a_long_job_after_max_wait_steps_under_short_jobs(max_wait_steps):
    long = req("long", 8, 4)
    arrivals = short_stream(30)
    arrivals[0].insert(0, long)
    sim = SimEngine(
        SJFScheduler(SJFScheduler.Options(max_wait_steps=max_wait_steps)),
        paged_cache(),
        max_running=1,
    )
    sim.run(arrivals)
    # One slot, short jobs finish in their first step: the slot is free every step, so the
    # long job is passed over exactly max_wait_steps times.
    assert sim.admission_step_of("long") == max_wait_steps


def test_sjf_without_aging_starves_the_long_job_under_short_jobs():
    long = req("long", 8, 4)
    arrivals = short_stream(30)
    arrivals[0].insert(0, long)
    sim = SimEngine(
        SJFScheduler(SJFScheduler.Options(max_wait_steps=10_000)), paged_cache(), max_running=1
    )
    sim.run(arrivals)
    assert sim.admission_step_of("long") == 30


def test_sjf_counts_passed_over_steps_on_the_request():
    sjf = SJFScheduler()
    sim = SimEngine(sjf, paged_cache(), max_running=1)
    small, big = req("small", 2, 3), req("big", 8, 3)
    sim.add(big, small)
    sim.step()
    sim.step()
    assert sjf.steps_passed_over(big) == 2
    assert big.plugin_state["sjf"] == 2
    assert sjf.steps_passed_over(small) == 0


# ---------------------------------------------------------------------- priority preemption


def test_priority_preempts_the_least_important_most_recent_for_a_more_important_request():
    sim = SimEngine(PriorityScheduler(), paged_cache(), max_running=2)
    low_old, low_new = req("low-old", 4, 10, priority=5), req("low-new", 4, 10, priority=5)
    high = req("high", 4, 3, priority=0)
    sim.run({0: [low_old], 1: [low_new], 3: [high]})
    assert sim.preempted[3] == ["low-new"]
    assert sim.admitted[3] == ["high"]
    assert low_new.num_preemptions == 1 and low_old.num_preemptions == 0
    assert all(r.num_output_tokens == r.params.max_tokens for r in (low_old, low_new, high))


def test_priority_preempts_lower_levels_before_higher_ones_when_kv_is_short():
    # 9 pages of 4 tokens: mid and low hold 2 and 3 and each take 1 more for this step's
    # decode, leaving 2. Urgent needs 5: preempting low gives back its 3 + 1, leaving 1 page,
    # which tiny then takes without preempting mid.
    sim = SimEngine(PriorityScheduler(), paged_cache(num_pages=9), max_running=8)
    mid, low = req("mid", 8, 4, priority=3), req("low", 12, 4, priority=4)
    sim.add(mid, low)
    sim.step()
    sim.add(req("urgent", 20, 2, priority=0), req("tiny", 2, 2, priority=0))
    sim.step()
    assert sim.preempted[1] == ["low"]
    assert sim.admitted[1] == ["urgent", "tiny"]


def test_priority_never_preempts_for_an_equally_important_request():
    sim = SimEngine(PriorityScheduler(), paged_cache(), max_running=2)
    first, second = req("first", 4, 6, priority=1), req("second", 4, 6, priority=1)
    same = req("same", 4, 2, priority=1)
    sim.run({0: [first, second], 1: [same]})
    assert not any(sim.preempted)
    assert sim.admission_step_of("same") == 6


def test_priority_preemption_can_be_turned_off():
    sched = PriorityScheduler(PriorityScheduler.Options(preempt_for_priority=False))
    sim = SimEngine(sched, paged_cache(), max_running=1)
    sim.run({0: [req("low", 4, 5, priority=9)], 1: [req("high", 4, 1, priority=0)]})
    assert not any(sim.preempted)
    assert sim.admission_step_of("high") == 5


def test_priority_does_not_preempt_when_it_would_not_make_room():
    # 4 pages: same holds 2, low 1, 1 is free; urgent needs 3, low could free only 1 more.
    sim = SimEngine(PriorityScheduler(), paged_cache(num_pages=4), max_running=8)
    sim.add(req("same", 6, 10, priority=0), req("low", 2, 10, priority=5))
    sim.step()
    sim.add(req("urgent", 12, 1, priority=0))
    sim.step()
    assert sim.preempted[1] == [] and sim.admitted[1] == []


# ---------------------------------------------------------------------- chunked prefill


def test_chunked_prefill_splits_a_long_prompt_under_the_token_budget():
    sim = SimEngine(FCFSScheduler(), paged_cache(), max_batched_tokens=16)
    long = req("long", 50, 3)
    sim.run({0: [long]})
    assert [s["long"] for s in sim.scheduled] == [16, 16, 16, 2, 1, 1]
    assert long.num_output_tokens == 3


def test_chunked_prefill_shares_the_budget_with_running_decodes():
    sim = SimEngine(FCFSScheduler(), paged_cache(), max_batched_tokens=16)
    sim.run({0: [req("dec", 4, 5)], 1: [req("long", 40, 2)]})
    assert sim.scheduled[1] == {"dec": 1, "long": 15}
    assert sim.scheduled[2] == {"dec": 1, "long": 15}
    assert sim.scheduled[3] == {"dec": 1, "long": 10}


def test_no_request_is_given_tokens_past_the_model_length():
    plan = FCFSScheduler().schedule(
        waiting=[req("A", 30, 1)], running=[], budget=StepBudget(64, 4, 20), kv=paged_cache()
    )
    assert plan.scheduled[0].num_tokens == 20


def test_a_request_is_not_admitted_into_fewer_free_pages_than_it_needs():
    plan = FCFSScheduler().schedule(
        waiting=[req("A", 20, 1)],
        running=[],
        budget=StepBudget(64, 4, 4096),
        kv=paged_cache(num_pages=4),
    )
    assert not plan


# ---------------------------------------------------------------------- KV pressure


def test_kv_exhaustion_preempts_the_most_recent_request_which_later_finishes():
    # 6 pages of 4 tokens; each request ends at 15 tokens = 4 pages: both cannot finish at once.
    sim = SimEngine(FCFSScheduler(), paged_cache(num_pages=6))
    a, b, c = req("A", 4, 12), req("B", 4, 12), req("C", 2, 2)
    sim.run({0: [a, b], 6: [c]})
    assert a.num_preemptions == 0 and b.num_preemptions >= 1
    assert all(r.num_output_tokens == r.params.max_tokens for r in (a, b, c))
    preempting_steps = [k for k, ids in enumerate(sim.preempted) if ids]
    assert preempting_steps and all(sim.preempted[k] == ["B"] for k in preempting_steps)
    # No new admissions in a step that had to preempt.
    assert all(not sim.admitted[k] for k in preempting_steps)


def test_fcfs_head_of_line_request_that_does_not_fit_blocks_smaller_ones():
    sim = SimEngine(FCFSScheduler(), paged_cache(num_pages=4))
    sim.add(req("R", 8, 10))
    sim.step()
    sim.add(req("X", 12, 1), req("Y", 4, 1))
    sim.step()
    assert sim.admitted[1] == []


def test_a_policy_without_head_of_line_blocking_admits_around_a_request_that_does_not_fit():
    class FirstFit(FCFSScheduler):
        head_of_line_blocking = False

    sim = SimEngine(FirstFit(), paged_cache(num_pages=4))
    sim.add(req("R", 8, 10))
    sim.step()
    sim.add(req("X", 12, 1), req("Y", 4, 1))
    sim.step()
    assert sim.admitted[1] == ["Y"]


# ---------------------------------------------------------------------- conservativeness


@pytest.mark.parametrize(("conservativeness", "admitted"), [(0.0, 4), (0.5, 3), (1.0, 2)])
def test_conservativeness_reserves_pages_for_running_requests(conservativeness, admitted):
    # 8 pages of 4 tokens. Each request: 1 page now, 4 at its final 15 tokens (3 more).
    # c=1: the 2nd leaves 6 free >= 1 x (3 + 3); a 3rd would leave 5 < 9.
    # c=0.5: a 3rd leaves 5 >= 4.5; a 4th would leave 4 < 6.
    sched = FCFSScheduler(FCFSScheduler.Options(conservativeness=conservativeness))
    sim = SimEngine(sched, paged_cache(num_pages=8))
    sim.add(*[req(f"r{i}", 4, 12) for i in range(4)])
    sim.step()
    assert len(sim.admitted[0]) == admitted


def test_full_conservativeness_avoids_every_preemption_that_none_causes():
    runs = {}
    for c in (0.0, 1.0):
        sim = SimEngine(
            FCFSScheduler(FCFSScheduler.Options(conservativeness=c)), paged_cache(num_pages=8)
        )
        sim.run({0: [req(f"r{i}", 4, 12) for i in range(4)]})
        runs[c] = sum(len(p) for p in sim.preempted)
    assert runs[0.0] > 0 and runs[1.0] == 0


def test_conservativeness_is_waived_for_a_request_that_would_run_alone():
    sched = FCFSScheduler(FCFSScheduler.Options(conservativeness=10.0))
    sim = SimEngine(sched, paged_cache(num_pages=8))
    big = req("big", 4, 28)
    sim.run({0: [big]})
    assert big.num_output_tokens == 28


def test_conservativeness_defaults_to_the_engine_setting_unless_given():
    ctx = PluginContext(engine={"schedule_conservativeness": 0.7})
    default, explicit = FCFSScheduler(), FCFSScheduler(FCFSScheduler.Options(conservativeness=0))
    default.setup(ctx)
    explicit.setup(ctx)
    assert default.options.conservativeness == 0.7
    assert explicit.options.conservativeness == 0


# ---------------------------------------------------------------------- options


@pytest.mark.parametrize("policy", [FCFSScheduler, SJFScheduler, PriorityScheduler])
def test_every_policy_rejects_unknown_and_negative_options(policy):
    with pytest.raises(pydantic.ValidationError):
        policy.Options(no_such_knob=1)
    with pytest.raises(pydantic.ValidationError, match="conservativeness"):
        policy.Options(conservativeness=-1)
    assert policy.Options.model_fields["conservativeness"].description


# ---------------------------------------------------------------------- any workload


workloads = st.lists(
    st.tuples(st.integers(1, 40), st.integers(1, 12), st.integers(0, 3), st.integers(0, 8)),
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None)
@given(
    policy=st.sampled_from([FCFSScheduler, SJFScheduler, PriorityScheduler]),
    requests=workloads,
    max_batched_tokens=st.integers(4, 48),
    max_running=st.integers(1, 5),
    spare_pages=st.integers(0, 6),
    conservativeness=st.sampled_from([0.0, 0.5, 1.0]),
)
def test_every_request_finishes_under_any_policy_and_budget(
    policy, requests, max_batched_tokens, max_running, spare_pages, conservativeness
):
    sched = policy(policy.Options(conservativeness=conservativeness))
    sim, reqs = run_workload(sched, requests, max_batched_tokens, max_running, spare_pages)
    assert all(r.num_output_tokens == r.params.max_tokens for r in reqs)
    assert sim.cache.num_free_pages == sim.cache.num_pages


def run_workload(
    sched: PolicyScheduler,
    requests: list[tuple[int, int, int, int]],
    max_batched_tokens: int,
    max_running: int,
    spare_pages: int,
    max_model_len: int = 4096,
) -> tuple[SimEngine, list[Request]]:
    """Run `requests` (prompt length, max_tokens, priority, arrival step) to the end."""
    # The core admits only requests that fit the cache alone, as here.
    largest = max(min(p + m, max_model_len) for p, m, _, _ in requests)
    cache = paged_cache(num_pages=-(-largest // 4) + spare_pages)
    sim = SimEngine(sched, cache, max_batched_tokens, max_running, max_model_len)
    reqs, arrivals = [], {}
    for i, (prompt, max_tokens, priority, step) in enumerate(requests):
        reqs.append(req(f"r{i}", min(prompt, max_model_len - 1), max_tokens, priority))
        arrivals.setdefault(step, []).append(reqs[-1])
    sim.run(arrivals, max_steps=2000)
    return sim, reqs


# ---------------------------------------------------------------------- the decode fast path


def looping(policy: type[PolicyScheduler]) -> type[PolicyScheduler]:
    """`policy` as written in its contract: `sorted(..., key=sort_key)` and the per-request
    loop every step (no whole-list decode step, no order computed in C)."""
    return type(
        f"Looping{policy.__name__}",
        (policy,),
        {
            "_schedule_decode": lambda *args: False,
            "_in_order": lambda self, requests: sorted(requests, key=self.sort_key),
        },
    )


@settings(max_examples=40, deadline=None)
@given(
    policy=st.sampled_from([FCFSScheduler, SJFScheduler, PriorityScheduler, LPMScheduler]),
    requests=workloads,
    max_batched_tokens=st.integers(2, 48),
    max_running=st.integers(1, 6),
    spare_pages=st.integers(0, 6),
    conservativeness=st.sampled_from([0.0, 1.0]),
    max_model_len=st.sampled_from([24, 4096]),
)
def test_the_fast_paths_schedule_as_the_policy_contract(
    policy, requests, max_batched_tokens, max_running, spare_pages, conservativeness, max_model_len
):
    logs = []
    for cls in (policy, looping(policy)):
        options = {"max_wait_steps": 3} if "max_wait_steps" in cls.Options.model_fields else {}
        sched = cls(cls.Options(conservativeness=conservativeness, **options))
        sim, _ = run_workload(
            sched, requests, max_batched_tokens, max_running, spare_pages, max_model_len
        )
        in_order = [list(step.items()) for step in sim.scheduled]  # plan order counts
        logs.append((in_order, sim.admitted, sim.preempted))
    assert logs[0] == logs[1]


def test_a_decode_plan_changed_after_its_step_does_not_change_the_next_one():
    sched, cache = FCFSScheduler(), paged_cache()
    sim = SimEngine(sched, cache)
    sim.add(req("A", 4, 8), req("B", 4, 8))
    sim.step()  # prefill
    first = sim.step()  # decode
    assert [s.num_tokens for s in first.scheduled] == [1, 1]
    first.scheduled[0].num_tokens = 3  # the plan's objects belong to whoever holds it now
    second = sim.scheduler.schedule(
        waiting=[], running=list(sim.running), budget=sim.budget, kv=cache
    )
    assert [s.num_tokens for s in second.scheduled] == [1, 1]
    assert [s.request for s in second.scheduled] == sim.running


@pytest.mark.parametrize("queued", [False, True])
def test_decode_steps_that_run_out_of_pages_preempt_the_most_recent_request(queued):
    sim = SimEngine(FCFSScheduler(), paged_cache(num_pages=3, page_size=4))
    sim.add(req("A", 4, 4), req("B", 4, 4))
    sim.step()  # both prefilled into a page each; their next tokens each need a new page
    if queued:
        sim.add(req("C", 4, 1))  # admission reads the exact pages left after the decodes
    plan = sim.step()
    assert [r.request_id for r in plan.preempted] == ["B"]
    assert [s.request.request_id for s in plan.scheduled] == ["A"]
