"""Decode batches (`ModelRunner._prepare_decode`: positions and KV slots from the page-table
array, the inputs of a pending step on the device) and the Triton backend's sequence lengths
and page table after its `prepare` stay equal to a build from the requests' lists whatever
happens between steps: requests finishing, joining, preempted, a page boundary crossed, a
prefix cache swapping pages, a KV cache swap. (Session 19 removed the steady decode step these
tests were written for; they now hold the path every decode step takes.)"""

from __future__ import annotations

import pytest
from pegboard.core.llm import LLM
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request, SamplingParams


def _triton_shadow(info: ModelInfo, page_size: int):
    """A Triton backend fed every batch the engine runs (only `prepare`: no kernel runs)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend

    pool = KVPool(k=[], v=[], page_size=page_size)
    return TritonAttentionBackend(info, pool, max_requests=4)


def _expected(batch: ForwardBatch, page_size: int):
    """Positions, KV slots, sequence lengths and page tables from the requests' lists."""
    starts = [r.num_computed_tokens for r in batch.requests]
    slots = [r.page_table[s // page_size] * page_size + s % page_size for r, s in zip(
        batch.requests, starts)]  # fmt: skip
    tables = [
        list(r.page_table[: -(-(s + 1) // page_size)]) for r, s in zip(batch.requests, starts)
    ]
    return starts, slots, [s + 1 for s in starts], tables


class Checker:
    """Wraps the model runner's `forward`: checks every decode-only batch (and a Triton
    backend's metadata after its own `prepare` of the same batch) against `_expected`."""

    def __init__(self, llm: LLM) -> None:
        engine = llm.engine
        self.page_size = engine.config.page_size
        self.checked = 0
        self.shadow = _triton_shadow(engine.info, self.page_size)
        forward = engine.runner.forward

        def checked(batch):
            self.check(batch)
            return forward(batch)

        engine.runner.forward = checked

    def check(self, batch: ForwardBatch) -> None:
        self.shadow.prepare(batch)  # every batch, as the engine's backend sees them
        if not batch.is_decode_only:
            return
        starts, slots, seq_lens, tables = _expected(batch, self.page_size)
        n = batch.num_requests
        assert batch.positions.tolist() == starts
        assert batch.slot_mapping.tolist() == slots
        assert batch.seq_lens_cpu == seq_lens
        assert [list(t) for t in batch.page_tables_cpu] == tables
        assert batch.logits_indices.tolist() == list(range(n))
        assert self.shadow.seq_lens[:n].tolist() == seq_lens
        assert self.shadow.seq_lens[n:].tolist() == [0] * (len(self.shadow.seq_lens) - n)
        table = self.shadow.page_table
        assert [table[i, : len(t)].tolist() for i, t in enumerate(tables)] == tables
        self.checked += 1


def _drive(llm: LLM, prompts, params, joins=(), swaps=()):
    """Step the engine over `prompts`; `joins` adds (step, prompt, params) requests at that
    step, `swaps` (step, slot, name) swaps a plugin before it. Returns the requests."""
    engine = llm.engine
    requests = [Request(list(p), q) for p, q in zip(prompts, params)]
    for r in requests:
        engine.add_request(r)
    step = 0
    while engine.has_work() or any(s >= step for s, *_ in joins):
        for at, prompt, p in joins:
            if at == step:
                requests.append(Request(list(prompt), p))
                engine.add_request(requests[-1])
        for at, slot, name in swaps:
            if at == step:
                llm.swap(slot, name)
        engine.step()
        step += 1
    return requests


def _prompts(n: int, length: int = 6) -> list[list[int]]:
    return [[(11 * i + 5 * j) % 200 + 4 for j in range(length + i % 3)] for i in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_decode_batches_equal_a_build_from_the_lists_as_requests_finish_and_join(
    tiny_llama_dir, overlap
):
    settings = dict(dtype="float32", device="cpu", page_size=4, disable_overlap=not overlap)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        checker = Checker(llm)
        params = [
            SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for m in (14, 9, 17)
        ]
        joins = [(5, _prompts(4)[3], GREEDY), (7, [9, 8, 7], GREEDY)]
        requests = _drive(llm, _prompts(3), params, joins=joins)
        assert [len(r.output_token_ids) for r in requests] == [14, 9, 17, 14, 14]
    assert checker.checked >= 10


def test_preemption_and_page_boundaries_keep_decode_batches_exact(tiny_llama_dir):
    settings = dict(dtype="float32", device="cpu", page_size=4, kv_cache_tokens=128)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        checker = Checker(llm)
        params = SamplingParams(temperature=0.7, seed=3, max_tokens=40, ignore_eos=True)
        requests = _drive(llm, _prompts(4, 10), [params] * 4)
        assert sum(r.num_preemptions for r in requests) > 0
    assert checker.checked >= 10


def test_a_prefix_cache_and_a_kv_cache_swap_keep_decode_batches_exact(tiny_llama_dir):
    settings = dict(dtype="float32", device="cpu", page_size=2, kv_cache="radix")
    shared = _prompts(1, 9)[0]
    prompts = [shared + [40 + i] for i in range(3)]
    with LLM(str(tiny_llama_dir), **settings) as llm:
        checker = Checker(llm)
        joins = [(4, shared + [60], GREEDY), (6, shared + [61], GREEDY)]
        _drive(llm, prompts, [GREEDY] * 3, joins=joins, swaps=[(9, "kv_cache", "paged")])
        assert llm.engine.kv.__class__.__name__.lower().startswith("paged")
    assert checker.checked >= 10
