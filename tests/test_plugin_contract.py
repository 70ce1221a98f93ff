"""The engine checks what plugins return (issue 10, items 1-3): a broken scheduler, sampler or
exporter fails loudly, with an error naming the plugin, its distribution and the rule; it is
counted per (slot, plugin); and it hurts nothing else.

One engine serves the whole module; each test swaps a deliberately broken plugin in (swaps are
applied at the next step boundary) and the standard one back afterwards."""

from __future__ import annotations

import importlib_metadata
import pytest
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core.contract import SCHEDULER_FAILURE_LIMIT
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.server.admin import plugin_report
from pegboard.plugins.metrics.prometheus import PrometheusExporter
from pegboard.plugins.sampling.standard import StandardSampler
from pegboard.plugins.scheduling.fcfs import FCFSScheduler
from pegboard.sdk.slots import MetricsExporter
from pegboard.sdk.types import (
    FinishReason,
    Request,
    SampleOutput,
    SamplingParams,
    ScheduledRequest,
)

VERSION = importlib_metadata.version("pegboard")
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
KV_TOKENS = 64  # 4 pages of 16: three 20-token prompts cannot all fit at once
BUDGET = 64


# ---------------------------------------------------------------- broken schedulers


class GreedyAll(FCFSScheduler):
    """Schedules every waiting request whole, ignoring the budget, the cap and the KV cache."""

    name = "greedy-all"

    def schedule(self, waiting, running, budget, kv):
        plan = super().schedule(waiting=[], running=running, budget=budget, kv=kv)
        plan.scheduled += [ScheduledRequest(r, r.num_tokens) for r in waiting]
        return plan


class Twice(FCFSScheduler):
    name = "twice"

    def schedule(self, waiting, running, budget, kv):
        plan = super().schedule(waiting=waiting, running=running, budget=budget, kv=kv)
        if plan.scheduled:
            plan.scheduled.append(ScheduledRequest(plan.scheduled[0].request, 1))
        return plan


class ZeroTokens(FCFSScheduler):
    name = "zero-tokens"

    def schedule(self, waiting, running, budget, kv):
        plan = super().schedule(waiting=waiting, running=running, budget=budget, kv=kv)
        if plan.scheduled:
            plan.scheduled[0].num_tokens = 0
        return plan


class Ghost(FCFSScheduler):
    """Schedules a request the engine never saw."""

    name = "ghost"

    def schedule(self, waiting, running, budget, kv):
        plan = super().schedule(waiting=waiting, running=running, budget=budget, kv=kv)
        plan.scheduled.append(ScheduledRequest(Request([1, 2, 3]), 3))
        return plan


class Raising(FCFSScheduler):
    name = "raising"

    def schedule(self, waiting, running, budget, kv):
        raise ValueError("the policy table is corrupt")


class Flaky(FCFSScheduler):
    """Raises on its first call only."""

    name = "flaky"
    calls = 0

    def schedule(self, waiting, running, budget, kv):
        Flaky.calls += 1
        if Flaky.calls == 1:
            raise RuntimeError("transient")
        return super().schedule(waiting=waiting, running=running, budget=budget, kv=kv)


# ---------------------------------------------------------------- broken samplers


def _tokens(sampler, logits, requests):
    return StandardSampler.sample(sampler, logits, requests).tokens


class ShortSampler(StandardSampler):
    name = "short"

    def sample(self, logits, requests):
        return SampleOutput(_tokens(self, logits, requests)[:-1], [None] * len(requests))


class FloatSampler(StandardSampler):
    name = "float"

    def sample(self, logits, requests):
        return SampleOutput(_tokens(self, logits, requests).float(), [None] * len(requests))


class OutOfVocabSampler(StandardSampler):
    name = "out-of-vocab"

    def sample(self, logits, requests):
        tokens = _tokens(self, logits, requests) + logits.shape[-1]
        return SampleOutput(tokens, [None] * len(requests))


class NegativeListSampler(StandardSampler):
    name = "negative-list"

    def sample(self, logits, requests):
        return SampleOutput([-5] * len(requests), [None] * len(requests))


class WrongShapeSampler(StandardSampler):
    name = "wrong-shape"

    def sample(self, logits, requests):
        tokens = _tokens(self, logits, requests).unsqueeze(1)
        return SampleOutput(tokens, [None] * len(requests))


class NoneSampler(StandardSampler):
    name = "returns-none"

    def sample(self, logits, requests):
        return None


class RaisingSampler(StandardSampler):
    name = "raising-sampler"

    def sample(self, logits, requests):
        raise IndexError("top-k table out of range")


class ColdSampler(StandardSampler):
    """Its `warm_up` fails (a kernel it cannot build ahead); sampling itself works."""

    name = "cold"

    def warm_up(self, vocab_size, dtype, device):
        raise RuntimeError("no compiler for this device")


class BanningSampler(StandardSampler):
    """Bans one token by writing the logits in place, as the hookspec allows."""

    name = "banning"
    banned = 0

    def sample(self, logits, requests):
        logits[:, self.banned] = float("-inf")
        return super().sample(logits, requests)


class Boom(MetricsExporter):
    name = "boom"

    def export_metrics(self, snapshot):
        raise RuntimeError("disk full")


BROKEN = [GreedyAll, Twice, ZeroTokens, Ghost, Raising, Flaky, ShortSampler, FloatSampler,
          OutOfVocabSampler, NegativeListSampler, WrongShapeSampler, NoneSampler, RaisingSampler,
          BanningSampler, ColdSampler, Boom]  # fmt: skip


def manager() -> PluginManager:
    pm = PluginManager()
    for cls in BROKEN:
        pm.add(cls, distribution="pegboard")  # named as a distribution's plugin would be
    return pm


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    llm = LLM(
        str(tiny_llama_dir), plugins=manager(), dtype="float32", device="cpu",
        kv_cache_tokens=KV_TOKENS, page_size=16, max_num_batched_tokens=BUDGET,
        max_running_requests=4, metrics=["prometheus"],
    )  # fmt: skip
    yield llm
    llm.close()


def with_plugin(llm: LLM, slot: str, name: str, prompts, default: str):
    """Generate `prompts` with `name` swapped into `slot`, then swap the default back."""
    llm.swap(slot, name)
    try:
        return llm.generate(prompts, GREEDY)
    finally:
        llm.swap(slot, default)
        llm.engine.step()  # applies the swap back


def prompts(n: int, length: int) -> list[list[int]]:
    return [[7 + i + j for j in range(length)] for i in range(n)]


def errors(llm: LLM, slot: str, name: str) -> int:
    return llm.engine.guard.errors.get((slot, name), 0)


# ---------------------------------------------------------------- schedulers


@pytest.mark.parametrize(
    ("name", "batch", "rule"),
    [
        ("greedy-all", prompts(3, 30), "token budget"),  # 90 tokens > 64
        ("greedy-all", prompts(5, 6), "request cap"),  # 5 requests > 4
        ("greedy-all", prompts(3, 20), "pages fit"),  # 3 x 2 pages > 4 pages
        ("twice", prompts(2, 5), "scheduled twice"),
        ("zero-tokens", prompts(2, 5), "zero tokens"),
        ("ghost", prompts(2, 5), "unknown request"),
    ],
)
def test_a_plan_breaking_a_rule_is_an_error_naming_the_plugin_and_the_rule(llm, name, batch, rule):
    before = errors(llm, "scheduler", name)
    outs = with_plugin(llm, "scheduler", name, batch, "fcfs")
    for o in outs:
        assert o.finish_reason is FinishReason.ERROR
        assert f"scheduler {name!r} (pegboard {VERSION}) broke the rule '{rule}'" in o.error
        assert "model" not in o.error
    # Failed only after the limit of failing steps in a row, and counted each time.
    assert errors(llm, "scheduler", name) - before == SCHEDULER_FAILURE_LIMIT
    assert not llm.engine.has_work() and llm.engine.kv.usage() == 0


def test_a_raising_scheduler_is_named_and_fails_requests_only_after_the_limit(llm):
    outs = with_plugin(llm, "scheduler", "raising", prompts(2, 5), "fcfs")
    for o in outs:
        assert o.error.startswith(
            f"scheduler 'raising' (pegboard {VERSION}) raised ValueError: the policy table is "
            f"corrupt ({SCHEDULER_FAILURE_LIMIT} steps in a row)"
        )
    # The engine serves again once a working scheduler is back.
    ok = llm.generate(prompts(2, 5), GREEDY)
    assert all(o.finish_reason is FinishReason.LENGTH and len(o.token_ids) == 4 for o in ok)


def test_one_scheduler_exception_fails_no_waiting_request(llm):
    Flaky.calls = 0
    before = errors(llm, "scheduler", "flaky")
    outs = with_plugin(llm, "scheduler", "flaky", prompts(3, 5), "fcfs")
    assert Flaky.calls > 1
    assert all(o.error is None and len(o.token_ids) == 4 for o in outs)
    assert errors(llm, "scheduler", "flaky") - before == 1


# ---------------------------------------------------------------- samplers


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("short", "one token per request"),
        ("float", "integer dtype"),
        ("out-of-vocab", "ids in vocabulary"),
        ("negative-list", "ids in vocabulary"),
        ("wrong-shape", "shape"),
        ("returns-none", "output type"),
    ],
)
def test_a_sample_output_breaking_a_rule_fails_its_requests_naming_the_plugin(llm, name, rule):
    before = errors(llm, "sampler", name)
    outs = with_plugin(llm, "sampler", name, prompts(2, 5), "standard")
    for o in outs:
        assert o.finish_reason is FinishReason.ERROR
        assert f"sampler {name!r} (pegboard {VERSION}) broke the rule '{rule}'" in o.error
        assert o.token_ids == []  # no bad token reached a request
    assert errors(llm, "sampler", name) > before
    assert not llm.engine.has_work() and llm.engine.kv.usage() == 0


def test_a_raising_sampler_is_named_never_model(llm):
    outs = with_plugin(llm, "sampler", "raising-sampler", prompts(2, 5), "standard")
    for o in outs:
        assert o.error == (
            f"sampler 'raising-sampler' (pegboard {VERSION}) raised IndexError: "
            "top-k table out of range"
        )


def test_a_failing_warm_up_is_logged_naming_the_sampler_and_sampling_goes_on(llm, caplog):
    [plain] = llm.generate(prompts(1, 5), GREEDY)
    with caplog.at_level("ERROR", logger="pegboard.engine"):
        [cold] = with_plugin(llm, "sampler", "cold", prompts(1, 5), "standard")
    assert cold.error is None and cold.token_ids == plain.token_ids
    assert f"sampler 'cold' (pegboard {VERSION}): warm_up failed (RuntimeError: no compiler" in (
        caplog.text
    )


def test_a_sampler_may_ban_a_token_by_writing_the_logits_in_place(llm):
    [plain] = llm.generate(prompts(1, 5), GREEDY)
    BanningSampler.banned = plain.token_ids[0]
    [banned] = with_plugin(llm, "sampler", "banning", prompts(1, 5), "standard")
    assert banned.error is None, banned.error
    assert len(banned.token_ids) == 4 and BanningSampler.banned not in banned.token_ids


# ---------------------------------------------------------------- exporters, metrics, admin


def test_a_raising_exporter_is_counted_and_shown_and_fails_nothing(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), plugins=manager(), dtype="float32", device="cpu",
              metrics=["boom", "prometheus"])  # fmt: skip
    try:
        outs = llm.generate(prompts(2, 5), GREEDY)
        assert all(o.error is None and len(o.token_ids) == 4 for o in outs)
        count = errors(llm, "metrics", "boom")
        assert count >= llm.engine.num_steps  # every snapshot raised and was counted
        llm.generate(prompts(1, 5), GREEDY)  # one more step carries the final count
        [prom] = [p for p in llm.engine.plugins.active_all("metrics") if p.name == "prometheus"]
        text = prom.render().decode()
        line = next(x for x in text.splitlines() if x.startswith("pegboard:plugin_errors_total{"))
        assert 'slot="metrics"' in line and 'plugin="boom"' in line
        assert float(line.split()[-1]) >= count
        report = plugin_report(llm.engine)
        [boom] = [p for p in report["plugins"] if p["name"] == "boom"]
        assert boom["errors"] == errors(llm, "metrics", "boom") > 0
        assert {"slot": "metrics", "plugin": "boom", "errors": boom["errors"]} in report[
            "plugin_errors"
        ]
    finally:
        llm.close()


def test_the_prometheus_exporter_counts_plugin_errors_by_slot_and_plugin():
    from pegboard.sdk.types import MetricsSnapshot

    exporter = PrometheusExporter()
    for n in (1, 3, 3):
        exporter.export_metrics(
            MetricsSnapshot("step", 0.0, plugin_errors={("scheduler", "lifo"): n})
        )
    text = exporter.render().decode()
    assert (
        'pegboard:plugin_errors_total{model_name="pegboard",plugin="lifo",slot="scheduler"} 3.0'
        in text
    )


def test_an_unregistered_plugin_is_named_by_its_class():
    pm = PluginManager(entry_points=False)
    assert pm.describe(Raising()) == (
        f"scheduler 'raising' ({Raising.__module__}:{Raising.__qualname__})"
    )


def test_device_ids_are_clamped_for_the_next_step_and_checked_on_the_host():
    """On CUDA the sampled ids feed the next step before the host sees them (overlap)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from pegboard.core.overlap import PendingStep

    requests = [Request([1, 2]), Request([3, 4])]
    step = PendingStep(requests, SampleOutput(torch.tensor([5, 999], device="cuda"), [None] * 2),
                       vocab_size=100)  # fmt: skip
    assert step.tokens.tolist() == [5, 99] and step.on_device
    assert step.take() == [5, 999]


@pytest.mark.gpu
def test_out_of_vocab_ids_on_cuda_fail_their_requests_and_the_device_stays_usable(tiny_llama_dir):
    """With overlap the bad ids feed the next step before the host sees them: they must be
    clamped there (no device-side assert), then fail their requests naming the sampler."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    llm = LLM(str(tiny_llama_dir), plugins=manager(), dtype="float32", sampler="out-of-vocab",
              **GPU_ENGINE)  # fmt: skip
    try:
        outs = llm.generate(prompts(3, 5), GREEDY)
        for o in outs:
            assert "sampler 'out-of-vocab'" in o.error and "'ids in vocabulary'" in o.error
        llm.swap("sampler", "standard")
        ok = llm.generate(prompts(2, 5), GREEDY)  # the CUDA context is still healthy
        assert all(o.error is None and len(o.token_ids) == 4 for o in ok)
    finally:
        llm.close()
