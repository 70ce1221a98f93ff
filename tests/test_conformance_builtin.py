"""The conformance kit (`pegboard.sdk.testing`) passes every built-in plugin and goes red on
plugins that break their slot's contract on purpose."""

from __future__ import annotations

import importlib
import math

import pytest
import torch
from pegboard.sdk import testing
from pegboard.sdk.slots import AttentionBackend, KVCache, MetricsExporter, Sampler, Scheduler
from pegboard.sdk.types import KVPool, SampleOutput, ScheduledRequest, SchedulePlan


def builtin(path: str):
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as e:  # a built-in still being written: skip its slot
        pytest.skip(f"{module} does not import yet: {e}")


@pytest.mark.parametrize(
    "check, path, options",
    [
        (testing.check_scheduler, "pegboard.plugins.scheduling.fcfs:FCFSScheduler", None),
        (testing.check_scheduler, "pegboard.plugins.scheduling.sjf:SJFScheduler", None),
        (
            testing.check_scheduler,
            "pegboard.plugins.scheduling.sjf:SJFScheduler",
            {"max_wait_steps": 2},
        ),
        (testing.check_scheduler, "pegboard.plugins.scheduling.priority:PriorityScheduler", None),
        (testing.check_scheduler, "pegboard.plugins.scheduling.lpm:LPMScheduler", None),
        (testing.check_kv_cache, "pegboard.plugins.cache.paged:PagedCache", None),
        (testing.check_kv_cache, "pegboard.plugins.cache.radix:RadixCache", None),
        (testing.check_kv_cache, "pegboard.plugins.cache.hicache:HiCache", None),
        (testing.check_sampler, "pegboard.plugins.sampling.standard:StandardSampler", None),
        (testing.check_attention, "pegboard.plugins.kernels.attention_torch:TorchAttention", None),
        (
            testing.check_metrics_exporter,
            "pegboard.plugins.metrics.prometheus:PrometheusExporter",
            None,
        ),
    ],
    ids=lambda v: v.rsplit(":", 1)[-1] if isinstance(v, str) else None,
)
def test_builtin_plugin_conforms(check, path, options):
    check(builtin(path), options)


def test_builtin_attention_conforms_in_bfloat16():
    testing.check_attention(
        builtin("pegboard.plugins.kernels.attention_torch:TorchAttention"), dtype=torch.bfloat16
    )


def test_jsonl_exporter_conforms(tmp_path):
    cls = builtin("pegboard.plugins.metrics.jsonl:JsonlExporter")
    testing.check_metrics_exporter(cls, {"path": str(tmp_path / "m.jsonl")})


# ---------------------------------------------------------------- deliberately wrong plugins


class Greedy(Scheduler):
    """Runs everything at once: ignores the token budget and the request cap."""

    name = "greedy"

    def schedule(self, waiting, running, budget, kv):
        return SchedulePlan(
            [ScheduledRequest(r, r.num_uncomputed_tokens) for r in running + waiting]
        )


class Blind(Scheduler):
    """Admits one request at a time, but counts a waiting request's tokens from 0, ignoring
    its prefix-cache hit."""

    name = "blind"

    def schedule(self, waiting, running, budget, kv):
        plan, left = SchedulePlan(), budget.max_batched_tokens
        for r in running or waiting[:1]:
            n = min(r.num_uncomputed_tokens, left)
            if n:
                plan.scheduled.append(ScheduledRequest(r, n))
                left -= n
        return plan


class Twice(Scheduler):
    """Lists the first request twice."""

    name = "twice"

    def schedule(self, waiting, running, budget, kv):
        queue = running or waiting
        return SchedulePlan([ScheduledRequest(queue[0], 1)] * 2 if queue else [])


class Idle(Scheduler):
    """Never schedules anything."""

    name = "idle"

    def schedule(self, waiting, running, budget, kv):
        return SchedulePlan()


class Thief(Scheduler):
    """Preempts a waiting request (it holds no KV)."""

    name = "thief"

    def schedule(self, waiting, running, budget, kv):
        return SchedulePlan(preempted=waiting[:1])


@pytest.mark.parametrize(
    "cls, rule",
    [
        (Greedy, "at most budget|the pages needed"),
        (Blind, "counts from the end of its cached prefix"),
        (Twice, "scheduled twice"),
        (Idle, "make progress"),
        (Thief, "only running requests"),
    ],
)
def test_kit_rejects_a_wrong_scheduler(cls, rule):
    with pytest.raises(testing.ConformanceError, match=rule):
        testing.check_scheduler(cls)


class FreeList(KVCache):
    """A correct minimal paged cache that the broken ones below bend."""

    name = "free-list"

    def setup(self, ctx, previous=None):
        self.page_size = ctx.engine["page_size"]
        pages = ctx.engine["kv_cache_tokens"] // self.page_size
        self.pool = KVPool.allocate(ctx.model, pages, self.page_size)
        self.free_pages = list(range(pages))

    @property
    def num_free_pages(self):
        return len(self.free_pages)

    def pages_needed(self, request, num_new_tokens):
        return self.missing_pages(request, num_new_tokens)

    def missing_pages(self, request, num_new_tokens):
        total = request.num_computed_tokens + num_new_tokens
        return math.ceil(total / self.page_size) - len(request.page_table)

    def allocate_kv(self, scheduled, num_tokens):
        failed = []
        for r, n in zip(scheduled, num_tokens):
            need = self.missing_pages(r, n)
            if need > len(self.free_pages):
                failed.append(r)
            else:
                r.page_table += [self.free_pages.pop() for _ in range(need)]
        return failed

    def free(self, request):
        self.free_pages += request.page_table
        request.page_table = []


def test_the_minimal_cache_conforms():
    testing.check_kv_cache(FreeList)


class DoubleFree(FreeList):
    """Returns the pages on free but keeps the page table: a second free frees them again."""

    name = "double-free"

    def free(self, request):
        self.free_pages += request.page_table


class OffByOne(FreeList):
    """Reports one page fewer than it allocates."""

    name = "off-by-one"

    def pages_needed(self, request, num_new_tokens):
        return max(self.missing_pages(request, num_new_tokens) - 1, 0)


class Leaky(FreeList):
    """Forgets the last page of every freed request."""

    name = "leaky"

    def free(self, request):
        self.free_pages += request.page_table[:-1]
        request.page_table = []


class Sharer(FreeList):
    """Takes pages off the free list as it should, but hands every request the first page it
    ever gave out instead of the one it took."""

    name = "sharer"

    def allocate_kv(self, scheduled, num_tokens):
        for r, n in zip(scheduled, num_tokens):
            for _ in range(self.missing_pages(r, n)):
                page = self.free_pages.pop()
                self.first = getattr(self, "first", page)
                r.page_table.append(self.first)
        return []


@pytest.mark.parametrize(
    "cls, rule",
    [
        (Sharer, "referenced by one request"),
        (DoubleFree, "clears page_table"),
        (OffByOne, "pages_needed"),
        (Leaky, "never lost"),
    ],
)
def test_kit_rejects_a_wrong_kv_cache(cls, rule):
    with pytest.raises(testing.ConformanceError, match=rule):
        testing.check_kv_cache(cls)


class Unfiltered(Sampler):
    """Samples from the full softmax with the global RNG: ignores filters and seeds."""

    name = "unfiltered"

    def sample(self, logits, requests):
        greedy = logits.argmax(-1)
        drawn = torch.multinomial(logits.softmax(-1), 1).squeeze(1)
        tokens = [int(g if r.params.greedy else d) for r, g, d in zip(requests, greedy, drawn)]
        return SampleOutput(tokens, [None] * len(requests))


class Contrary(Sampler):
    """Picks the least likely token."""

    name = "contrary"

    def sample(self, logits, requests):
        return SampleOutput(logits.argmin(-1).tolist(), [None] * len(requests))


@pytest.mark.parametrize(
    "cls, rule", [(Unfiltered, "never emit an excluded token"), (Contrary, "argmax")]
)
def test_kit_rejects_a_wrong_sampler(cls, rule):
    with pytest.raises(testing.ConformanceError, match=rule):
        testing.check_sampler(cls)


def test_kit_rejects_an_attention_backend_with_the_wrong_scale():
    torch_attention = builtin("pegboard.plugins.kernels.attention_torch:TorchAttention")

    class Unscaled(torch_attention):
        name = "unscaled"

        def attention_kernel(self, model, pool):
            backend = super().attention_kernel(model, pool)
            backend.scale = 1.0
            return backend

    with pytest.raises(testing.ConformanceError, match="dense reference"):
        testing.check_attention(Unscaled)


def test_kit_rejects_an_attention_backend_that_does_not_write_the_pool():
    class Forgetful(AttentionBackend):
        def prepare(self, batch):
            pass

        def forward(self, layer, q, k, v):
            return torch.zeros_like(q)

    class ForgetfulAttention(builtin("pegboard.plugins.kernels.attention_torch:TorchAttention")):
        name = "forgetful"

        def attention_kernel(self, model, pool):
            return Forgetful(model, pool)

    with pytest.raises(testing.ConformanceError, match="writes k, v into the pool"):
        testing.check_attention(ForgetfulAttention)


def test_kit_rejects_an_exporter_that_keeps_requests():
    class Hoarder(MetricsExporter):
        name = "hoarder"
        kept: list = []

        def export_metrics(self, snapshot):
            self.kept.append(snapshot)

    with pytest.raises(testing.ConformanceError, match="must not keep references"):
        testing.check_metrics_exporter(Hoarder)


def test_kit_rejects_a_plugin_of_another_slot():
    with pytest.raises(testing.ConformanceError, match="must fill slot 'kv_cache'"):
        testing.check_kv_cache(Idle)
