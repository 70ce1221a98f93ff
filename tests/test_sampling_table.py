"""The core's table of sampling parameters (`pegboard.core.sampling_table`): a `sample` call
gets exactly its requests' `SamplingParams` as arrays, and sampling through it draws the tokens
that sampling from the requests' own params draws."""

from __future__ import annotations

import functools
import random

import numpy as np
import pytest
import torch
from fixtures.devices import DEVICES
from pegboard.core.sampling_table import SamplingTable
from pegboard.plugins.sampling.standard import StandardSampler
from pegboard.sdk import SampleRequests, SamplingBatch
from pegboard.sdk.types import Request, SamplingParams


def random_params(rng: random.Random) -> SamplingParams:
    return SamplingParams(
        temperature=rng.choice([0.0, 0.5, 1.0, 1.7]),
        top_k=rng.choice([0, 3, 10**6]),
        top_p=rng.choice([1.0, 0.8]),
        min_p=rng.choice([0.0, 0.05]),
        seed=rng.choice([None, 7, -3, 2**40 + 5]),
        repetition_penalty=rng.choice([1.0, 1.2]),
        frequency_penalty=rng.choice([0.0, 0.4]),
        presence_penalty=rng.choice([0.0, -0.3]),
        logprobs=rng.choice([None, 0, 4]),
    )


def test_a_batch_from_the_table_equals_one_read_from_the_requests():
    rng = random.Random(0)
    table = SamplingTable(capacity=2)  # small: slots must grow and be reused
    live: list[Request] = []
    for _ in range(200):
        if live and rng.random() < 0.4:
            table.remove(live.pop(rng.randrange(len(live))))
        else:
            live.append(Request([1], random_params(rng)))
            table.add(live[-1])
        batch = rng.sample(live, rng.randint(0, len(live)))
        got, want = table.batch(batch), SamplingBatch.of(batch)
        np.testing.assert_array_equal(got.values, want.values)
        np.testing.assert_array_equal(got.seeds, want.seeds)
        np.testing.assert_array_equal(got.seqs, want.seqs)
        if batch:
            np.testing.assert_array_equal(got.on_device(torch.device("cpu")).numpy(), want.values)
    assert len(table) == len(live)


@pytest.mark.parametrize("device", DEVICES)
def test_the_device_rows_are_the_host_rows(device):
    device = torch.device(device)
    table = SamplingTable(capacity=2)
    live = [Request([1], random_params(random.Random(i))) for i in range(6)]
    for r in live:
        table.add(r)
    first = table.batch(live[::2])
    table.remove(live[0])  # a slot freed and taken: the device copy is made again
    table.add(late := Request([1], SamplingParams(temperature=0.25, top_k=7)))
    for batch in (first, table.batch([late, *live[1:]])):
        got = batch.on_device(device)
        assert got.device.type == device.type and got.dtype == torch.float64
        np.testing.assert_array_equal(got.cpu().numpy(), batch.values)


def test_requests_without_a_slot_are_read_from_their_params():
    table = SamplingTable()
    known, stranger = Request([1], SamplingParams(temperature=0.3)), Request([1])
    table.add(known)
    batch = table.batch([known, stranger])
    assert batch.column("temperature").tolist() == [0.3, 1.0]


def test_the_sampler_draws_the_same_tokens_from_the_table_as_from_the_requests():
    rng = random.Random(1)
    logits = [torch.randn(12, 40, generator=torch.Generator().manual_seed(i)) * 3 for i in range(5)]

    def run(with_table: bool) -> list[list[int]]:
        requests = [Request([1, 2, 3], random_params(rng), seq=i) for i in range(12)]
        table, sampler, out = SamplingTable(), StandardSampler(), []
        for r in requests:
            table.add(r)
        for step in logits:
            given = SampleRequests(requests, functools.partial(table.batch, requests))
            ids = sampler.sample(step.clone(), given if with_table else list(requests)).token_ids
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            for r, t in zip(requests, ids):
                r.append_token(t)
            out.append(ids)
        return out

    state = rng.getstate()
    from_table = run(with_table=True)
    rng.setstate(state)
    assert from_table == run(with_table=False)


def test_the_sampler_reads_the_parameters_from_the_batch_it_is_given():
    r = Request([1], SamplingParams(temperature=0.0))
    calls = []

    def build() -> SamplingBatch:  # says temperature 1.0 with a seed: the sampler must draw
        calls.append(1)
        batch = SamplingBatch.of([Request([1], SamplingParams(temperature=1.0, seed=1))])
        return batch

    logits = torch.tensor([[5.0, 4.9, 4.8, 4.7]])
    drawn = {
        StandardSampler().sample(logits.clone(), SampleRequests([r], build)).token_ids[0]
        for _ in range(8)
    }
    assert calls and drawn != {0}  # greedy would always give 0


def test_the_engine_gives_the_sampler_its_requests_parameters_and_frees_their_slots(
    tiny_llama_dir,
):
    from pegboard.core.llm import LLM

    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu") as llm:
        sampler = llm.engine.plugins.active("sampler")
        seen = []
        batch_facts = sampler._batch_facts  # reads `requests.sampling` when the batch changed

        def spy(requests, vocab):
            seen.append((requests.sampling.values.copy(), SamplingBatch.of(requests).values))
            return batch_facts(requests, vocab)

        sampler._batch_facts = spy
        params = [
            SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
            SamplingParams(max_tokens=3, temperature=0.8, top_k=4, seed=5, ignore_eos=True),
            SamplingParams(max_tokens=5, temperature=1.1, logprobs=2, ignore_eos=True),
        ]
        llm.generate([[5] * 4, [6] * 7, [7] * 3], params)
        assert seen and all(np.array_equal(got, want) for got, want in seen)
        assert len(llm.engine.guard.sampling) == 0  # every finished request gave its slot back
