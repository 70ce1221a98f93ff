"""The conformance kit: run it in your plugin's own tests.

    from pegboard.sdk.testing import check_scheduler

    def test_my_policy_conforms():
        check_scheduler(MyPolicy)

Each `check_<slot>(cls, options=None, ...)` builds the plugin the way the engine does (options
validated by its `Options` model, `setup` with a `PluginContext`, registered with a
`PluginManager`, hooks called through pluggy), drives it through seeded random workloads made of
`pegboard.sdk.types.Request`s, and raises `ConformanceError` (an `AssertionError`, so pytest
shows it as a failure) quoting the contract sentence that was broken — the sentences of the
slot docstrings in `pegboard.sdk.slots` and the hookspecs in `pegboard.core.hookspecs`.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import random
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.sampling import SampleRequests, SamplingBatch
from pegboard.sdk.slots import SLOTS, AttentionBackend, KVCache, Plugin, PluginContext
from pegboard.sdk.types import (
    ForwardBatch,
    KVPool,
    MetricsSnapshot,
    ModelInfo,
    Request,
    RequestStatus,
    SampleOutput,
    SamplingParams,
    SchedulePlan,
    StepBudget,
)

__all__ = [
    "ConformanceError",
    "check_attention",
    "check_kv_cache",
    "check_metrics_exporter",
    "check_sampler",
    "check_scheduler",
    "plugin_context",
    "tiny_model_info",
]


class ConformanceError(AssertionError):
    """A plugin broke its slot's contract; the message quotes the rule and shows the case."""


def _require(ok: bool, rule: str, detail: str = "") -> None:
    if not ok:
        raise ConformanceError(f"{rule}" + (f"\n  case: {detail}" if detail else ""))


def _no_raw_errors(check: Callable) -> Callable:
    """A plugin that raises while the kit drives it fails a rule (naming the check and the
    exception) instead of crashing the kit with a bare IndexError or ValueError."""

    @functools.wraps(check)
    def run(cls, *args, **kwargs):
        try:
            return check(cls, *args, **kwargs)
        except ConformanceError:
            raise
        except Exception as e:
            name = getattr(cls, "__qualname__", repr(cls))
            raise ConformanceError(
                f"the plugin handles every valid input of {check.__name__} without raising"
                f"\n  case: {name} raised {type(e).__name__}: {e}"
            ) from e

    return run


def tiny_model_info(dtype: torch.dtype = torch.float32, device: str = "cpu") -> ModelInfo:
    """The shape of a tiny model (2 layers, 4 query / 2 KV heads, head size 8, vocab 64)."""
    return ModelInfo(
        architecture="ConformanceModel",
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=8,
        hidden_size=32,
        vocab_size=64,
        max_model_len=256,
        dtype=dtype,
        device=torch.device(device),
    )


def plugin_context(
    model: ModelInfo | None = None, page_size: int = 4, kv_cache_tokens: int = 128
) -> PluginContext:
    """A `PluginContext` like the engine's, sized for the kit's workloads."""
    model = model or tiny_model_info()
    return PluginContext(
        model=model,
        device=model.device,
        engine={
            "page_size": page_size,
            "kv_cache_tokens": kv_cache_tokens,
            "kv_memory_bytes": kv_cache_tokens * KVPool.bytes_per_token(model),
            "gpu_memory_utilization": 0.85,
            "max_running_requests": 4,
            "schedule_conservativeness": 0.0,
            "seed": 0,
        },
    )


@contextmanager
def _selected(
    cls: type[Plugin], slot: str, options: dict[str, Any] | None, ctx: PluginContext
) -> Iterator[tuple[PluginManager, Plugin]]:
    """The plugin created, set up and registered as the engine does it; closed afterwards."""
    _require(
        cls.slot == slot,
        f"the plugin must fill slot {slot!r} (subclass {SLOTS[slot].base.__name__})",
        f"{cls.__qualname__}.slot == {cls.slot!r}",
    )
    manager = PluginManager(entry_points=False)
    info = manager.add(cls, name=cls.name or cls.__name__.lower())
    plugin = manager.create(slot, info.name, options)
    plugin.setup(ctx)
    manager.register(plugin)
    try:
        yield manager, plugin
    finally:
        manager.unregister(plugin)
        plugin.close()


# ---------------------------------------------------------------- scheduler


class _KitCache(KVCache):
    """The kit's KV cache for scheduler checks: a free list plus prefix hits the kit chooses.

    A hit's pages live in a separate store (ids >= `num_pages`), as a prefix cache's pages are
    held by its tree and not counted as free; a waiting request's pages are needed only after
    its hit."""

    name = "conformance-cache"

    def __init__(self, num_pages: int, page_size: int) -> None:
        super().__init__()
        self.page_size, self._num_pages = page_size, num_pages
        self.free_list = list(range(num_pages))
        self.hits: dict[str, int] = {}

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_free_pages(self) -> int:
        return len(self.free_list)

    def match_prefix(self, request: Request) -> int:
        return min(self.hits.get(request.request_id, 0), request.num_tokens - 1)

    def _start(self, request: Request) -> int:
        if request.num_computed_tokens or request.page_table:
            return request.num_computed_tokens
        return self.match_prefix(request)

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        start = self._start(request)
        have = len(request.page_table) or start // self.page_size
        return max(math.ceil((start + num_new_tokens) / self.page_size) - have, 0)

    def allocate_kv(self, scheduled: list[Request], num_tokens: list[int]) -> list[Request]:
        failed = []
        for r, n in zip(scheduled, num_tokens):
            need = self.pages_needed(r, n)
            if need > len(self.free_list):
                failed.append(r)
                continue
            if not r.num_computed_tokens and not r.page_table:
                hit = self.match_prefix(r)
                r.num_computed_tokens = r.num_cached_tokens = hit
                r.page_table = [self._num_pages + i for i in range(hit // self.page_size)]
            r.page_table += [self.free_list.pop() for _ in range(need)]
        return failed

    def free(self, request: Request) -> None:
        self.free_list += [p for p in request.page_table if p < self._num_pages]
        request.page_table = []


@_no_raw_errors
def check_scheduler(
    cls: type[Plugin],
    options: dict[str, Any] | None = None,
    *,
    seed: int = 0,
    num_requests: int = 40,
    max_steps: int = 2000,
) -> None:
    """Check a scheduler against the `schedule` hookspec on simulated engine runs.

    Workloads: a roomy cache, a tight one that forces preemption, a small token budget (chunked
    prefill) and requests with prefix-cache hits. The kit plays the engine (queues,
    allocation, forward, sampling, finishing) and checks every plan; every request must finish.
    """
    scenarios = [
        dict(budget=(256, 8), pages=64, page_size=4, hit_rate=0.0),
        dict(budget=(64, 6), pages=10, page_size=4, hit_rate=0.0),
        dict(budget=(7, 4), pages=32, page_size=4, hit_rate=0.0),
        dict(budget=(48, 4), pages=24, page_size=4, hit_rate=0.6),
    ]
    for i, scenario in enumerate(scenarios):
        _run_scheduler(
            cls, options, random.Random(seed * 100 + i), num_requests, max_steps, **scenario
        )


def _run_scheduler(
    cls: type[Plugin],
    options: dict[str, Any] | None,
    rng: random.Random,
    num_requests: int,
    max_steps: int,
    budget: tuple[int, int],
    pages: int,
    page_size: int,
    hit_rate: float,
) -> None:
    max_model_len = pages * page_size
    step_budget = StepBudget(budget[0], budget[1], max_model_len)
    cache = _KitCache(pages, page_size)
    ctx = plugin_context(page_size=page_size, kv_cache_tokens=pages * page_size)
    ctx.engine["max_running_requests"] = budget[1]
    arrivals = []
    for _ in range(num_requests):
        prompt = [rng.randrange(1, 1000) for _ in range(rng.randint(1, min(24, max_model_len - 9)))]
        params = SamplingParams(max_tokens=rng.randint(1, 8), temperature=0.0)
        r = Request(prompt, params, priority=rng.randint(0, 2))
        if rng.random() < hit_rate and len(prompt) > page_size:
            cache.hits[r.request_id] = page_size * rng.randint(1, (len(prompt) - 1) // page_size)
        arrivals.append((rng.randint(0, num_requests), r))
    arrivals.sort(key=lambda a: a[0])
    waiting: list[Request] = []
    running: list[Request] = []
    finished: list[Request] = []
    with _selected(cls, "scheduler", options, ctx) as (manager, _):
        for step in range(max_steps):
            while arrivals and arrivals[0][0] <= step:
                waiting.append(arrivals.pop(0)[1])
            if not waiting and not running and not arrivals:
                return
            waiting_before, running_before = list(waiting), list(running)
            plan = manager.hook.schedule(
                waiting=waiting, running=running, budget=step_budget, kv=cache
            )
            case = f"step {step}, budget {step_budget}, {cache.num_free_pages} free pages"
            _require(
                waiting == waiting_before and running == running_before,
                "schedule: do not mutate the list; the core moves requests between queues",
                case,
            )
            _require(isinstance(plan, SchedulePlan), "schedule returns a SchedulePlan", repr(plan))
            _check_plan(plan, waiting, running, step_budget, cache, case)
            if not plan.scheduled and not running and waiting:
                first = waiting[0]
                _require(
                    False,
                    "a scheduler must make progress: with nothing running, the first waiting "
                    "request fits an empty cache and the budget, yet the plan was empty",
                    f"{case}; waiting {[r.num_tokens for r in waiting]}; first {first.request_id}",
                )
            _apply_plan(plan, waiting, running, finished, cache, max_model_len)
        _require(
            False,
            f"every request must finish: {len(waiting) + len(running)} still queued after "
            f"{max_steps} steps (a starved request or a stuck plan)",
            f"waiting {[r.request_id for r in waiting]}, running {[r.request_id for r in running]}",
        )


def _check_plan(
    plan: SchedulePlan,
    waiting: list[Request],
    running: list[Request],
    budget: StepBudget,
    cache: _KitCache,
    case: str,
) -> None:
    ids = [id(s.request) for s in plan.scheduled]
    _require(len(ids) == len(set(ids)), "no request is scheduled twice in one plan", case)
    running_ids, waiting_ids = {id(r) for r in running}, {id(r) for r in waiting}
    preempted = {id(r) for r in plan.preempted}
    _require(
        len(preempted) == len(plan.preempted) and preempted <= running_ids,
        "only running requests (holding KV) can be preempted, each once",
        f"{case}; preempted {[r.request_id for r in plan.preempted]}",
    )
    _require(
        not preempted & set(ids), "a preempted request is not scheduled in the same step", case
    )
    _require(
        plan.num_tokens <= budget.max_batched_tokens,
        "the sum of num_tokens is at most budget.max_batched_tokens",
        f"{case}; plan has {plan.num_tokens} tokens",
    )
    holders = len(running) - len(preempted) + sum(1 for i in ids if i in waiting_ids)
    _require(
        holders <= budget.max_running_requests,
        "at most budget.max_running_requests requests hold KV after the step",
        f"{case}; {holders} would hold KV",
    )
    pages = 0
    for s in plan.scheduled:
        r, n = s.request, s.num_tokens
        _require(
            id(r) in running_ids or id(r) in waiting_ids,
            "only requests passed in waiting or running are scheduled",
            f"{case}; {r.request_id}",
        )
        start = r.num_computed_tokens if id(r) in running_ids else cache.match_prefix(r)
        _require(
            1 <= n <= r.num_tokens - start,
            "a scheduled request gets at least one token and no more than it has uncomputed; "
            "a waiting request's num_tokens counts from the end of its cached prefix "
            "(kv.match_prefix)",
            f"{case}; {r.request_id} has {r.num_tokens} tokens, {start} computed or cached, "
            f"given {n}",
        )
        _require(
            start + n <= budget.max_model_len,
            "no request is given tokens past budget.max_model_len",
            f"{case}; {r.request_id}",
        )
        pages += cache.pages_needed(r, n)
    freed = sum(len([p for p in r.page_table if p < cache.num_pages]) for r in plan.preempted)
    _require(
        pages <= cache.num_free_pages + freed,
        "the pages needed by the scheduled requests fit in num_free_pages plus the pages of "
        "the requests listed in plan.preempted",
        f"{case}; needs {pages} pages, {cache.num_free_pages} free + {freed} preempted",
    )


def _apply_plan(
    plan: SchedulePlan,
    waiting: list[Request],
    running: list[Request],
    finished: list[Request],
    cache: _KitCache,
    max_model_len: int,
) -> None:
    """What the engine does with a plan: preempt, allocate, forward, sample, finish."""
    for r in reversed(plan.preempted):
        cache.free(r)
        running.remove(r)
        r.num_computed_tokens, r.status = 0, RequestStatus.WAITING
        r.num_preemptions += 1
        waiting.insert(0, r)
    scheduled = [s.request for s in plan.scheduled]
    failed = cache.allocate_kv(scheduled, [s.num_tokens for s in plan.scheduled])
    _require(not failed, "every scheduled request must fit the KV cache")
    for s in plan.scheduled:
        r = s.request
        if r.status is RequestStatus.WAITING:
            waiting.remove(r)
            running.append(r)
            r.status = RequestStatus.RUNNING
        r.num_computed_tokens += s.num_tokens
        if r.num_computed_tokens < r.num_tokens:
            continue
        r.append_token(7)
        if r.num_output_tokens >= r.params.max_tokens or r.num_tokens >= max_model_len:
            r.status = RequestStatus.FINISHED
            cache.free(r)
            running.remove(r)
            finished.append(r)


# ---------------------------------------------------------------- KV cache


@_no_raw_errors
def check_kv_cache(
    cls: type[Plugin],
    options: dict[str, Any] | None = None,
    *,
    page_size: int = 4,
    num_pages: int = 32,
    seed: int = 0,
    num_operations: int = 400,
) -> None:
    """Check a KV cache's invariants after every operation of a seeded random workload of
    admissions (with shared prefixes), growth, commits and frees."""
    rng = random.Random(seed)
    ctx = plugin_context(page_size=page_size, kv_cache_tokens=page_size * num_pages)
    with _selected(cls, "kv_cache", options, ctx) as (manager, cache):
        _require(
            cache.page_size == page_size and cache.num_pages >= num_pages,
            "setup sizes the pool from ctx.engine (kv_cache_tokens, page_size)",
            f"page_size {cache.page_size}, num_pages {cache.num_pages}",
        )
        _require(cache.num_free_pages == cache.num_pages, "a new cache has every page free")
        prefixes = [[rng.randrange(1, 500) for _ in range(page_size * k)] for k in (1, 2, 3)]
        live: list[Request] = []
        for op in range(num_operations):
            choice = rng.random()
            if choice < 0.35 and len(live) < 8:
                prefix = rng.choice(prefixes) if rng.random() < 0.6 else []
                tail = [rng.randrange(1, 500) for _ in range(rng.randint(1, 3 * page_size))]
                r = Request(prefix + tail, SamplingParams(max_tokens=16))
                if _kv_step(manager, cache, r, rng, f"op {op}: admit"):
                    live.append(r)
            elif choice < 0.75 and live:
                r = rng.choice(live)
                if r.num_computed_tokens == r.num_tokens:
                    r.append_token(rng.randrange(1, 500))
                _kv_step(manager, cache, r, rng, f"op {op}: grow {r.request_id}")
            elif live:
                r = live.pop(rng.randrange(len(live)))
                cache.free(r)
                _require(r.page_table == [], "free(request) clears page_table", f"op {op}")
                free_after = cache.num_free_pages
                cache.free(r)
                _require(
                    cache.num_free_pages == free_after and r.page_table == [],
                    "free is idempotent",
                    f"op {op}: second free of {r.request_id}",
                )
            _check_pages(cache, live, f"op {op}")
        for r in live:
            cache.free(r)
        _check_pages(cache, [], "after freeing every request")
        _require(
            cache.num_free_pages == cache.num_pages,
            "a page is never lost: with no request holding KV, num_free_pages (free plus "
            "evictable) counts every page",
            f"{cache.num_free_pages} of {cache.num_pages}",
        )


def _kv_step(
    manager: PluginManager, cache: KVCache, r: Request, rng: random.Random, case: str
) -> bool:
    """One `allocate_kv` for `r` (as the engine runs it), then the forward pass and `commit`."""
    waiting = not r.page_table and r.num_computed_tokens == 0
    hit = cache.match_prefix(r) if waiting else r.num_computed_tokens
    _require(
        0 <= hit < r.num_tokens,
        "match_prefix never covers the whole sequence: at least one token is left to compute",
        f"{case}: {hit} of {r.num_tokens}",
    )
    n = rng.randint(1, r.num_tokens - hit)
    need = cache.pages_needed(r, n)
    before, free_before = list(r.page_table), cache.num_free_pages
    failed = manager.hook.allocate_kv(scheduled=[r], num_tokens=[n])
    _require(isinstance(failed, list), "allocate_kv returns a list of the requests that failed")
    if failed:
        _require(
            failed == [r] and r.page_table == before,
            "a request that could not be given its pages keeps what it had",
            case,
        )
        _require(
            need > cache.num_free_pages,
            "allocate_kv succeeds when pages_needed fits num_free_pages",
            f"{case}: needed {need}, {cache.num_free_pages} free",
        )
        return False
    ps = cache.page_size
    if waiting:
        _require(
            r.num_computed_tokens == hit and r.num_cached_tokens == hit,
            "for a new request allocate_kv claims the prefix match_prefix reported: it sets "
            "num_computed_tokens and num_cached_tokens to the hit length",
            f"{case}: hit {hit}, num_computed_tokens {r.num_computed_tokens}",
        )
    covered = r.num_computed_tokens + n
    _require(
        len(r.page_table) == math.ceil(covered / ps),
        "allocate_kv appends pages until page_table covers num_computed_tokens + n tokens",
        f"{case}: {covered} tokens, {len(r.page_table)} pages of {ps}",
    )
    taken = free_before - cache.num_free_pages
    _require(
        taken == need,
        "pages_needed(request, n) is what allocate_kv takes from num_free_pages (new pages, "
        "plus evictable prefix pages it locks)",
        f"{case}: pages_needed said {need}, num_free_pages fell by {taken}",
    )
    r.num_computed_tokens = covered
    cache.commit([r])
    return True


def _check_pages(cache: KVCache, live: list[Request], case: str) -> None:
    holders: dict[int, list[tuple[Request, int]]] = {}
    for r in live:
        for i, p in enumerate(r.page_table):
            _require(
                0 <= p < cache.num_pages,
                "page tables name pages of the pool",
                f"{case}: page {p}",
            )
            holders.setdefault(p, []).append((r, i))
    ps = cache.page_size
    for p, held in holders.items():
        if len(held) == 1:
            continue
        filling = [r for r, i in held if (i + 1) * ps > r.num_computed_tokens]
        contents = {tuple(r.token_ids[i * ps : (i + 1) * ps]) for r, i in held}
        _require(
            len(filling) <= 1 and len({i for _, i in held}) == 1 and len(contents) == 1,
            "a page is referenced by one request, or shared as a full page holding the same "
            "tokens at the same position (at most one holder still filling it)",
            f"{case}: page {p} in {[(r.request_id, i) for r, i in held]}",
        )
    _require(
        len(holders) + cache.num_free_pages <= cache.num_pages,
        "a page is either free or referenced, never both",
        f"{case}: {len(holders)} referenced + {cache.num_free_pages} free > {cache.num_pages}",
    )
    usage = cache.usage()
    _require(0.0 <= usage <= 1.0, "usage() is a fraction in [0, 1]", f"{case}: {usage}")


# ---------------------------------------------------------------- sampler


@_no_raw_errors
def check_sampler(
    cls: type[Plugin],
    options: dict[str, Any] | None = None,
    *,
    vocab_size: int = 48,
    seed: int = 0,
    draws: int = 64,
    transform: Callable[[torch.Tensor, list[Request]], torch.Tensor] | None = None,
) -> None:
    """Check a sampler: the output obeys the `sample` hookspec (a `SampleOutput`, one integer
    token id per request inside the vocabulary, a 1-D tensor), greedy is the argmax, filters
    never emit excluded tokens, penalties change greedy choices as specified, seeded requests
    reproduce regardless of batch composition, logprobs come from the raw logits; `warm_up`
    (if any) runs on the CPU and returns None.

    A sampler that changes the logits on purpose (bans a token, applies a grammar) passes
    `transform(logits, requests) -> logits`: what it does to the raw logits before choosing;
    the greedy, filter and penalty checks then expect choices from the transformed logits."""
    from pegboard.core.contract import ContractViolation, check_sample

    gen = torch.Generator().manual_seed(seed)

    def logits(rows: int) -> torch.Tensor:
        return torch.randn(rows, vocab_size, generator=gen) * 3

    def sample(raw: torch.Tensor, requests: list[Request]) -> SampleOutput:
        with _selected(cls, "sampler", options, plugin_context()) as (manager, _):
            with torch.inference_mode():  # as the engine calls it: logits writable in place
                out = manager.hook.sample(logits=raw.clone(), requests=requests)
        try:
            return check_sample(out, len(requests), vocab_size)
        except ContractViolation as e:
            raise ConformanceError(
                f"sample returns what the hookspec says: rule '{e.rule}'\n  case: {e.detail}"
            ) from None

    def expected(raw: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        return transform(raw.clone(), requests) if transform is not None else raw

    with _selected(cls, "sampler", options, plugin_context()) as (_, plugin):
        warm_up = getattr(plugin, "warm_up", None)
        if warm_up is not None:  # the engine calls it once the model is loaded
            with torch.inference_mode():
                _require(
                    warm_up(vocab_size, torch.float32, torch.device("cpu")) is None,
                    "warm_up(vocab_size, dtype, device) returns None",
                )
    raw = logits(draws)
    greedy = [Request([1], SamplingParams(temperature=0.0)) for _ in range(draws)]
    out = sample(raw, greedy)
    _require(
        out.token_ids == expected(raw, greedy).argmax(-1).tolist(),
        "greedy when temperature is 0: the argmax"
        + (" (of the transformed logits)" * bool(transform)),
    )
    as_engine = SampleRequests(greedy, functools.partial(SamplingBatch.of, greedy))
    _require(
        sample(raw, as_engine).token_ids == out.token_ids,
        "requests given as the engine gives them (a SampleRequests list with `sampling`) "
        "are sampled as a plain list",
    )

    def allowed_topk(row: torch.Tensor, k: int) -> set[int]:
        return set(row.topk(k).indices.tolist())

    def allowed_topp(row: torch.Tensor, p: float) -> set[int]:
        probs, order = row.softmax(-1).sort(descending=True)
        before = probs.cumsum(-1) - probs
        return set(order[before < p].tolist())

    def allowed_minp(row: torch.Tensor, m: float) -> set[int]:
        probs = row.softmax(-1)
        return set((probs >= m * probs.max()).nonzero().flatten().tolist())

    for field, value, allowed in [
        ("top_k", 3, allowed_topk),
        ("top_p", 0.5, allowed_topp),
        ("min_p", 0.3, allowed_minp),
    ]:
        raw = logits(draws)
        params = SamplingParams(temperature=1.0, seed=seed, **{field: value})
        requests = [Request([1], params) for _ in range(draws)]
        out = sample(raw, requests)
        for row, token in zip(expected(raw, requests), out.token_ids):
            _require(
                token in allowed(row, value),
                f"the filters (top-k, top-p, min-p) never emit an excluded token: {field}",
                f"{field}={value} emitted {token}, allowed {sorted(allowed(row, value))}",
            )

    _check_penalties(sample, logits, expected)
    _check_seeds(sample, logits, vocab_size)
    _check_logprobs(sample, logits, expected if transform is not None else None)
    if getattr(cls, "logits_in_model_dtype", False):
        _check_model_dtype_logits(sample, logits)


def _check_penalties(sample, logits, transformed) -> None:
    """Greedy with penalties picks the argmax of the penalised logits (vLLM's semantics)."""
    raw = logits(3)
    cases = [
        ("presence_penalty", 2.0),
        ("frequency_penalty", 1.5),
        ("repetition_penalty", 1.8),
    ]
    for field, value in cases:
        for row in range(raw.shape[0]):
            order = raw[row].argsort(descending=True).tolist()
            r = Request([order[2]], SamplingParams(temperature=0.0, **{field: value}))
            for t in (order[0], order[0], order[1]):
                r.append_token(t)
            expected = transformed(raw[row : row + 1], [r])[0].clone()
            counts = torch.bincount(torch.tensor(r.output_token_ids), minlength=raw.shape[1])
            if field == "repetition_penalty":
                seen = torch.zeros_like(expected, dtype=torch.bool)
                seen[torch.tensor(r.token_ids)] = True
                penalised = torch.where(expected > 0, expected / value, expected * value)
                expected = torch.where(seen, penalised, expected)
            elif field == "frequency_penalty":
                expected -= value * counts
            else:
                expected -= value * (counts > 0)
            out = sample(raw[row : row + 1], [r])
            _require(
                out.token_ids[0] == int(expected.argmax()),
                f"penalties are honoured ({field}: as vLLM applies it)",
                f"{field}={value}, output so far {r.output_token_ids}, got {out.token_ids[0]}, "
                f"expected {int(expected.argmax())}",
            )


def _check_seeds(sample, logits, vocab_size: int) -> None:
    steps = [logits(1)[0] for _ in range(6)]

    def run(position: int, batch: int, other_seed: int) -> list[int]:
        mine = Request([1], SamplingParams(temperature=1.0, seed=1234))
        others = [
            Request([1], SamplingParams(temperature=1.0, seed=other_seed + i)) for i in range(batch)
        ]
        for row in steps:
            requests = list(others)
            requests.insert(position, mine)
            raw = row.expand(len(requests), vocab_size).clone()
            raw[[i for i in range(len(requests)) if i != position]] += torch.randn(
                len(requests) - 1, vocab_size
            )
            mine.append_token(sample(raw, requests).token_ids[position])
        return mine.output_token_ids

    alone = run(0, 0, 0)
    mixed = run(2, 4, 99)
    _require(
        alone == mixed,
        "per-request seeds are reproducible regardless of batch composition",
        f"seed 1234 alone gave {alone}, in a batch of 5 (third) gave {mixed}",
    )


def _check_model_dtype_logits(sample, logits) -> None:
    """A sampler with `logits_in_model_dtype` gives, from bfloat16 / float16 logits, the tokens
    and logprobs it gives from their (exact) float32 conversion: greedy, seeded draws with and
    without filters, penalties, logprobs."""

    def requests() -> list[Request]:
        made = []
        for i, extra in enumerate(
            [
                {"temperature": 0.0},
                {"temperature": 0.8, "seed": 7},
                {"temperature": 1.0, "seed": 8, "top_k": 5},
                {"temperature": 0.7, "seed": 9, "top_p": 0.6, "logprobs": 3},
                {"temperature": 0.0, "repetition_penalty": 1.5, "logprobs": 2},
            ]
        ):
            r = Request([1, 2], SamplingParams(**extra))
            for t in range(i + 1):
                r.append_token(t)
            made.append(r)
        return made

    for dtype in (torch.bfloat16, torch.float16):
        raw = logits(5).to(dtype)
        low, full = sample(raw, requests()), sample(raw.float(), requests())
        _require(
            low.token_ids == full.token_ids,
            "logits_in_model_dtype: the same tokens from model-dtype logits as from float32",
            f"{dtype}: {low.token_ids} vs float32 {full.token_ids}",
        )
        for a, b in zip(low.logprobs, full.logprobs):
            _require(
                (a is None) == (b is None)
                and (a is None or (a.token_id == b.token_id and abs(a.logprob - b.logprob) < 1e-5)),
                "logits_in_model_dtype: the same logprobs from model-dtype logits as from float32",
                f"{dtype}: {a} vs float32 {b}",
            )


def _check_logprobs(sample, logits, transformed=None) -> None:
    """Logprobs from the raw logits' log-softmax; for a sampler with a stated transform, from
    the raw or the transformed logits (vLLM's `logprobs_mode` raw or processed)."""
    raw = logits(4)
    wants = [None, 0, 3, 5]
    requests = [
        Request([1], SamplingParams(temperature=0.7, seed=5, logprobs=k, top_k=10)) for k in wants
    ]
    out = sample(raw, requests)
    reference = raw.log_softmax(-1)
    if transformed is not None:
        processed = transformed(raw, requests).log_softmax(-1)
        first = next(i for i, lp in enumerate(out.logprobs) if lp is not None)
        lp = out.logprobs[first]
        if abs(lp.logprob - float(processed[first, lp.token_id])) < 1e-3:
            reference = processed
    for row, (k, token, lp) in enumerate(zip(wants, out.token_ids, out.logprobs)):
        if k is None:
            _require(lp is None, "no logprobs for a request whose params.logprobs is None")
            continue
        _require(
            lp is not None and lp.token_id == token,
            "logprobs are given for the chosen token of every request that asked",
        )
        _require(
            abs(lp.logprob - float(reference[row, token])) < 1e-3,
            "the chosen token's logprob is taken from the raw logits' log-softmax "
            "(before temperature, filters or penalties)",
            f"got {lp.logprob}, expected {float(reference[row, token])}",
        )
        best = reference[row].topk(k)
        got = [t for t, _ in lp.top]
        _require(
            len(lp.top) == k and got == best.indices.tolist(),
            "the top alternatives are the params.logprobs best tokens of the raw log-softmax, "
            "best first",
            f"logprobs={k}: got {lp.top}",
        )


# ---------------------------------------------------------------- attention


@_no_raw_errors
def check_attention(
    cls: type[Plugin],
    options: dict[str, Any] | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    seed: int = 0,
    atol: float | None = None,
    kv_atol: float = 0.25,
) -> None:
    """Check an attention backend against the kit's dense reference on a mixed batch (a fresh
    prefill, a prefill chunk over a cached prefix, decodes), layer by layer; also that it
    writes the new K/V into the pool at `slot_mapping`. The scale is 1/sqrt(head_dim), the
    default the hook's callers expect.

    A backend that stores K/V at a lower precision declares it (`AttentionBackend.kv_dtype`,
    e.g. `torch.float8_e4m3fn`): the stored K/V must then equal the new K/V rounded to that
    dtype within its relative precision, and the output must match the reference computed
    from the rounded K/V within `kv_atol` (inputs are standard normal).

    A backend that lets the model store K/V itself (`supports_fused_kv_store`) must name the
    layer's caches and the step's slots in `kv_store_target` and give `forward`'s output from
    `attend` over them.

    A backend with mixed-step CUDA graphs (`supports_cuda_graph_mixed`) must also give the same
    batch padded with rows of slot -1 (`prepare_mixed`) the same outputs on its real rows and
    store nothing for the padding rows."""
    atol = atol if atol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    model = tiny_model_info(dtype, device)
    page_size, num_pages = 4, 32
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    with _selected(cls, "attention", options, plugin_context(model)) as (manager, _):
        pool = KVPool.allocate(model, num_pages, page_size)
        for t in pool.k + pool.v:
            t.copy_(torch.randn(t.shape, generator=gen).to(dtype))
        backend = manager.hook.attention_kernel(model=model, pool=pool)
        _require(
            isinstance(backend, AttentionBackend),
            "attention_kernel returns an object implementing pegboard.sdk.AttentionBackend",
            repr(backend),
        )
        kv_dtype = getattr(backend, "kv_dtype", None)
        lossy = kv_dtype is not None and kv_dtype != dtype
        if lossy:
            atol = max(atol, kv_atol)
        shapes = [(0, 7), (6, 5), (9, 1), (13, 1), (4, 1)]  # (cached tokens, new tokens)
        free = list(range(num_pages))
        rng.shuffle(free)
        batch = _forward_batch(shapes, free, page_size, model.device)
        backend.prepare(batch)
        h, kvh, d = model.num_heads, model.num_kv_heads, model.head_dim
        for layer in range(model.num_layers):
            n = batch.num_tokens
            q = torch.randn(n, h, d, generator=gen).to(dtype).to(model.device)
            k = torch.randn(n, kvh, d, generator=gen).to(dtype).to(model.device)
            v = torch.randn(n, kvh, d, generator=gen).to(dtype).to(model.device)
            cached_k, cached_v = pool.k[layer].clone(), pool.v[layer].clone()
            out = backend.forward(layer, q, k, v)
            _require(
                tuple(out.shape) == (n, h, d),
                "forward returns [num_tokens, num_heads, head_dim]",
                f"layer {layer}: {tuple(out.shape)}",
            )
            flat_k = pool.k[layer].view(-1, kvh, d)
            flat_v = pool.v[layer].view(-1, kvh, d)
            if lossy:  # what the pool can hold of k, v at the declared precision
                k, v = (_rounded(t, kv_dtype) for t in (k, v))
            _require(
                _stored(flat_k[batch.slot_mapping], k, kv_dtype if lossy else None)
                and _stored(flat_v[batch.slot_mapping], v, kv_dtype if lossy else None),
                "forward writes k, v into the pool at batch.slot_mapping"
                + (f" (at its declared kv_dtype {kv_dtype})" if lossy else ""),
                f"layer {layer}",
            )
            expected = _reference_attention(batch, q, k, v, cached_k, cached_v, d**-0.5)
            err = (out.float() - expected).abs().max().item()
            _require(
                err <= atol,
                "the backend gives the same results as causal attention over each request's "
                "cached prefix and new tokens (the kit's dense reference) within its dtype's "
                "tolerance",
                f"layer {layer}, dtype {dtype}: max abs error {err:.2e} > {atol:.0e}",
            )
        if getattr(backend, "supports_fused_kv_store", False):
            _check_fused_kv_store(backend, batch, pool, gen)
        if getattr(backend, "supports_cuda_graph_mixed", False):
            _check_mixed_padding(backend, batch, pool, gen, atol)


def _check_fused_kv_store(
    backend: AttentionBackend, batch: ForwardBatch, pool: KVPool, gen: torch.Generator
) -> None:
    """`kv_store_target(0)` names layer 0's caches and the step's slots, and `attend` over the
    pool `forward` left gives `forward`'s output (`supports_fused_kv_store`)."""
    info, n = backend.model, batch.num_tokens
    q, k, v = (
        torch.randn(n, heads, info.head_dim, generator=gen).to(info.dtype).to(info.device)
        for heads in (info.num_heads, info.num_kv_heads, info.num_kv_heads)
    )
    backend.prepare(batch)
    out = backend.forward(0, q, k, v).clone()
    target = backend.kv_store_target(0)
    _require(
        target is None
        or (
            len(target) == 5
            and target[0] is pool.k[0]
            and target[1] is pool.v[0]
            and torch.equal(target[2], batch.slot_mapping)
        ),
        "kv_store_target(layer) returns (pool.k[layer], pool.v[layer], the step's "
        "slot_mapping, k_scale, v_scale) or None",
        repr(target)[:200],
    )
    _require(
        torch.equal(backend.attend(0, q), out),
        "attend(layer, q) over the K/V stored at kv_store_target gives forward's output",
        "layer 0 differs",
    )


def _check_mixed_padding(
    backend: AttentionBackend,
    batch: ForwardBatch,
    pool: KVPool,
    gen: torch.Generator,
    atol: float,
    rows: int = 32,
) -> None:
    """Layer 0 of `batch` eagerly (`prepare`) and padded to `rows` rows (`prepare_mixed`),
    from the same pool: the same real rows and the same pool afterwards."""
    info, n = backend.model, batch.num_tokens
    backend.prepare_for_capture(batch.num_requests)
    backend.prepare_for_mixed_capture(rows)
    shapes = ((info.num_heads, info.head_dim), (info.num_kv_heads, info.head_dim))
    q, k, v = (
        torch.randn(rows, *shapes[i > 0], generator=gen).to(info.dtype).to(info.device)
        for i in range(3)
    )
    start = (pool.k[0].clone(), pool.v[0].clone())
    backend.prepare(batch)
    eager = backend.forward(0, q[:n], k[:n], v[:n]).clone()
    stored = (pool.k[0].clone(), pool.v[0].clone())
    pool.k[0].copy_(start[0])
    pool.v[0].copy_(start[1])
    device = batch.input_ids.device
    padding = torch.full((rows - n,), -1, dtype=torch.int64, device=device)
    padded = dataclasses.replace(
        batch,
        input_ids=torch.cat([batch.input_ids, padding.clamp(min=0)]),
        positions=torch.cat([batch.positions, padding.clamp(min=0)]),
        slot_mapping=torch.cat([batch.slot_mapping, padding]),
    )
    backend.prepare_mixed(padded)
    out = backend.forward(0, q, k, v)
    _require(
        tuple(out.shape) == (rows, *shapes[0]),
        "prepare_mixed: forward returns a row per padded batch row",
        f"{tuple(out.shape)}",
    )
    err = (out[:n].float() - eager.float()).abs().max().item()
    _require(
        err <= atol,
        "prepare_mixed: the padded batch's real rows get the outputs of the unpadded batch",
        f"max abs error {err:.2e} > {atol:.0e}",
    )
    _require(
        torch.equal(pool.k[0], stored[0]) and torch.equal(pool.v[0], stored[1]),
        "prepare_mixed: padding rows (slot -1) store no K/V",
        "the pool differs from the unpadded batch's",
    )


def _rounded(t: torch.Tensor, kv_dtype: torch.dtype) -> torch.Tensor:
    return t.to(kv_dtype).to(t.dtype)


def _stored(stored: torch.Tensor, new: torch.Tensor, kv_dtype: torch.dtype | None) -> bool:
    """Whether the pool holds `new` (exactly, or within `kv_dtype`'s relative precision)."""
    if kv_dtype is None:
        return torch.equal(stored, new)
    eps = torch.finfo(kv_dtype).eps
    return torch.allclose(stored.float(), new.float(), rtol=eps, atol=eps)


def _forward_batch(
    shapes: list[tuple[int, int]], free: list[int], page_size: int, device: torch.device
) -> ForwardBatch:
    requests, input_ids, positions, slots, tables, query_lens, seq_lens = [], [], [], [], [], [], []
    for cached, new in shapes:
        seq = cached + new
        table = [free.pop() for _ in range(math.ceil(seq / page_size))]
        r = Request(list(range(1, seq + 1)))
        r.num_computed_tokens, r.page_table = cached, table
        requests.append(r)
        for pos in range(cached, seq):
            input_ids.append(pos + 1)
            positions.append(pos)
            slots.append(table[pos // page_size] * page_size + pos % page_size)
        tables.append(table)
        query_lens.append(new)
        seq_lens.append(seq)
    ends = torch.tensor(query_lens).cumsum(0) - 1

    def tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=device)

    return ForwardBatch(
        requests=requests,
        input_ids=tensor(input_ids),
        positions=tensor(positions),
        slot_mapping=tensor(slots),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        page_tables_cpu=tables,
        logits_indices=ends.to(device),
        samples=[True] * len(requests),
    )


def _reference_attention(
    batch: ForwardBatch,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pool_k: torch.Tensor,
    pool_v: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Dense causal attention per request in float32, from the pool as it was before the
    layer's writes plus the new tokens' k, v."""
    page_size = pool_k.shape[1]
    outs, start = [], 0
    for table, new, seq in zip(batch.page_tables_cpu, batch.query_lens_cpu, batch.seq_lens_cpu):
        cached = seq - new
        slots = torch.tensor(
            [table[i // page_size] * page_size + i % page_size for i in range(cached)],
            dtype=torch.int64,
        )
        keys = torch.cat([pool_k.flatten(0, 1)[slots].float(), k[start : start + new].float()])
        values = torch.cat([pool_v.flatten(0, 1)[slots].float(), v[start : start + new].float()])
        group = q.shape[1] // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)
        values = values.repeat_interleave(group, dim=1)
        query = q[start : start + new].float()
        scores = torch.einsum("qhd,khd->hqk", query, keys) * scale
        query_pos = torch.arange(cached, seq, device=scores.device).unsqueeze(1)
        future = torch.arange(seq, device=scores.device).unsqueeze(0) > query_pos
        scores.masked_fill_(future, float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), values))
        start += new
    return torch.cat(outs)


# ---------------------------------------------------------------- metrics


@_no_raw_errors
def check_metrics_exporter(
    cls: type[Plugin], options: dict[str, Any] | None = None, *, max_seconds: float = 0.05
) -> None:
    """Check a metrics exporter: it receives step and request snapshots through the broadcast
    hook, every single call returns within `max_seconds` (one stall of the step loop is a
    failure, however fast the others are), and it keeps no reference to `snapshot.request`
    beyond the call."""
    with _selected(cls, "metrics", options, plugin_context()) as (manager, _):
        request = Request([1, 2, 3], SamplingParams(max_tokens=2))
        request.append_token(4)
        request.status = RequestStatus.FINISHED
        ref = weakref.ref(request)
        snapshots = [
            MetricsSnapshot(kind="step", timestamp=time.time(), num_running=i) for i in range(20)
        ]
        snapshots.append(MetricsSnapshot(kind="request", timestamp=time.time(), request=request))
        for i, snapshot in enumerate(snapshots):
            start = time.perf_counter()
            manager.hook.export_metrics(snapshot=snapshot)
            seconds = time.perf_counter() - start
            _require(
                seconds <= max_seconds,
                "an exporter must return quickly (buffer, or hand off to its own thread)",
                f"call {i + 1} ({snapshot.kind} snapshot) took {seconds * 1e3:.1f} ms, "
                f"the limit per call is {max_seconds * 1e3:.0f} ms",
            )
        del snapshots, snapshot
        del request
        gc.collect()
        _require(
            ref() is None,
            "an exporter must not keep references to snapshot.request beyond the call",
        )


from pegboard.sdk.testing_linear import check_linear  # noqa: E402, F401  (linear slot)
from pegboard.sdk.testing_placement import check_expert_placement  # noqa: E402, F401, I001
from pegboard.sdk.testing_router import check_router  # noqa: E402, F401  (router slot's kit)
from pegboard.sdk.testing_speculator import check_speculator  # noqa: E402, F401  (speculator)
from pegboard.sdk.testing_transfer import check_transfer  # noqa: E402, F401  (transfer slot)
