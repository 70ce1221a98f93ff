"""Conformance kit gaps (issue 10, item 6): a sampler that changes the logits can be checked;
malformed sample outputs fail their own rule; a plugin's exception is a failed rule, never a raw
crash of the kit; one stalled exporter call fails; a backend storing K/V at a declared lower
precision passes within that precision; `StandardSampler` is exported from `pegboard.sdk`."""

from __future__ import annotations

import time

import pytest
import torch
from pegboard.plugins.kernels.attention_torch import TorchAttention, TorchAttentionBackend
from pegboard.plugins.scheduling.fcfs import FCFSScheduler
from pegboard.sdk import MetricsExporter, SampleOutput, StandardSampler
from pegboard.sdk.testing import (
    ConformanceError,
    check_attention,
    check_metrics_exporter,
    check_sampler,
    check_scheduler,
)

BANNED = 5


class Banning(StandardSampler):
    """Never emits token 5: sets its logit to -inf in place, then samples as the standard one."""

    name = "banning"

    def sample(self, logits, requests):
        logits[:, BANNED] = float("-inf")
        return super().sample(logits, requests)


def ban(logits, requests):
    logits[:, BANNED] = float("-inf")
    return logits


def test_a_sampler_that_bans_a_token_passes_when_it_states_its_transform():
    check_sampler(Banning, transform=ban)
    with pytest.raises(ConformanceError, match="greedy when temperature is 0"):
        check_sampler(Banning)  # without the transform the kit expects the raw argmax


def _broken(name: str, make):
    return type(name, (StandardSampler,), {"name": name.lower(), "sample": make})


@pytest.mark.parametrize(
    ("make", "rule"),
    [
        (lambda self, logits, requests: SampleOutput(logits.argmax(-1).float(), [None] * len(requests)), "integer dtype"),  # noqa: E501
        (lambda self, logits, requests: SampleOutput(logits.argmax(-1) + logits.shape[-1], [None] * len(requests)), "ids in vocabulary"),  # noqa: E501
        (lambda self, logits, requests: SampleOutput(logits.argmax(-1, keepdim=True), [None] * len(requests)), "shape"),  # noqa: E501
        (lambda self, logits, requests: SampleOutput(logits.argmax(-1)[:-1], [None] * len(requests)), "one token per request"),  # noqa: E501
        (lambda self, logits, requests: [0] * len(requests), "output type"),
    ],
)  # fmt: skip
def test_a_malformed_sample_output_fails_its_own_rule(make, rule):
    with pytest.raises(ConformanceError, match=f"rule '{rule}'"):
        check_sampler(_broken("Malformed", make))


def test_a_sampler_whose_warm_up_returns_something_fails_its_rule():
    def warm_up(self, vocab_size, dtype, device):
        return torch.zeros(vocab_size, dtype=dtype, device=device)  # not the contract's None

    bad = type("Eager", (StandardSampler,), {"name": "eager", "warm_up": warm_up})
    with pytest.raises(ConformanceError, match="warm_up.*returns None"):
        check_sampler(bad)


def test_a_plugin_exception_is_a_failed_rule_not_a_raw_crash():
    def explode(self, logits, requests):
        raise IndexError("list index out of range")

    with pytest.raises(ConformanceError, match="raised IndexError: list index out of range"):
        check_sampler(_broken("Exploding", explode))

    class BadScheduler(FCFSScheduler):
        name = "bad"

        def schedule(self, waiting, running, budget, kv):
            raise ValueError("bad policy")

    with pytest.raises(ConformanceError, match="(?s)without raising.*ValueError: bad policy"):
        check_scheduler(BadScheduler)


def test_one_stalled_exporter_call_fails_even_when_the_average_is_fast():
    class StallsOnRequests(MetricsExporter):
        name = "stalls"

        def export_metrics(self, snapshot):
            if snapshot.kind == "request":
                time.sleep(1.0)  # once in 21 calls: the average stays under the limit

    with pytest.raises(ConformanceError, match=r"call 21 \(request snapshot\) took"):
        check_metrics_exporter(StallsOnRequests, max_seconds=0.2)


class Bf16Store(TorchAttentionBackend):
    """The reference backend, storing K/V rounded to bfloat16 (a lossy KV cache)."""

    def forward(self, layer, q, k, v):
        return super().forward(layer, q, k.to(torch.bfloat16).float(), v.to(torch.bfloat16).float())


class Bf16Declared(Bf16Store):
    kv_dtype = torch.bfloat16


def _attention(backend: type) -> type:
    class Lossy(TorchAttention):
        name = "lossy"

        def attention_kernel(self, model, pool):
            return backend(model, pool)

    return Lossy


def test_a_lossy_kv_store_passes_within_its_declared_precision():
    check_attention(_attention(Bf16Declared))
    with pytest.raises(ConformanceError, match="writes k, v into the pool"):
        check_attention(_attention(Bf16Store))  # undeclared: held to exact storage
