"""The steady decode step (`pegboard.core.steady_decode`): positions and KV slots derived on
the device from the last decode step's, and the Triton backend's sequence lengths and page
table updated in place, stay equal to a build from the requests' lists whatever happens
between steps: requests finishing, joining, preempted, a page boundary crossed, a prefix cache
swapping pages, a KV cache swap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pegboard.core.llm import LLM
from pegboard.sdk.testing import tiny_model_info
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
        self.steady = self.checked = self.regathered = 0
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
        self.steady += batch.previous is not None
        self.regathered += batch.previous_rows is not None


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


@pytest.fixture(autouse=True)
def steady_on(monkeypatch):
    """The steady step is off by default (`pegboard.core.steady_decode`): on for these tests."""
    monkeypatch.setenv("PEGBOARD_STEADY_DECODE", "1")


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
    assert checker.steady >= 10 and checker.checked > checker.steady  # both paths ran
    assert checker.regathered >= 2  # steps right after a request finished


def test_preemption_and_page_boundaries_keep_the_steady_state_exact(tiny_llama_dir):
    settings = dict(dtype="float32", device="cpu", page_size=4, kv_cache_tokens=128)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        checker = Checker(llm)
        params = SamplingParams(temperature=0.7, seed=3, max_tokens=40, ignore_eos=True)
        requests = _drive(llm, _prompts(4, 10), [params] * 4)
        assert sum(r.num_preemptions for r in requests) > 0
    assert checker.steady >= 10, (checker.steady, checker.checked)


def test_a_prefix_cache_and_a_kv_cache_swap_keep_the_steady_state_exact(tiny_llama_dir):
    settings = dict(dtype="float32", device="cpu", page_size=2, kv_cache="radix")
    shared = _prompts(1, 9)[0]
    prompts = [shared + [40 + i] for i in range(3)]
    with LLM(str(tiny_llama_dir), **settings) as llm:
        checker = Checker(llm)
        joins = [(4, shared + [60], GREEDY), (6, shared + [61], GREEDY)]
        _drive(llm, prompts, [GREEDY] * 3, joins=joins, swaps=[(9, "kv_cache", "paged")])
        assert llm.engine.kv.__class__.__name__.lower().startswith("paged")
    assert checker.steady >= 10, (checker.steady, checker.checked)


def test_outputs_equal_with_the_steady_step_off(tiny_llama_dir, monkeypatch):
    from pegboard.core.steady_decode import SteadyDecode

    params = [SamplingParams(temperature=0.8, seed=i, max_tokens=20) for i in range(4)]
    settings = dict(dtype="float32", device="cpu", page_size=4)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        steady = [o.token_ids for o in llm.generate(_prompts(4), params)]
    monkeypatch.setattr(SteadyDecode, "follow", lambda self, *args: None)
    with LLM(str(tiny_llama_dir), **settings) as llm:
        rebuilt = [o.token_ids for o in llm.generate(_prompts(4), params)]
    assert steady == rebuilt


def test_the_triton_backend_uploads_everything_again_after_a_batch_that_is_not_its_last():
    shadow = _triton_shadow(tiny_model_info(), page_size=4)

    def batch(seq_lens, previous=None):
        n = len(seq_lens)
        return ForwardBatch(
            requests=[None] * n, input_ids=torch.zeros(n, dtype=torch.int64),
            positions=torch.zeros(n, dtype=torch.int64), slot_mapping=torch.zeros(n, dtype=torch.int64),
            query_lens_cpu=[1] * n, seq_lens_cpu=seq_lens,
            page_tables_cpu=[list(range(7, 7 + -(-s // 4))) for s in seq_lens],
            logits_indices=torch.arange(n), samples=[True] * n, previous=previous,
        )  # fmt: skip

    first, other = batch([5, 9]), batch([2, 3])
    shadow.prepare(first)
    shadow.prepare(other)  # prepared in between: `first` is no longer what the device holds
    shadow.prepare(batch([6, 10], previous=first))
    assert shadow.seq_lens[:2].tolist() == [6, 10]
    assert np.array_equal(shadow.page_table[1, :3].numpy(), [7, 8, 9])


# ------------------------------------------------------------------ SteadyDecode on its own


def _continue(tables: list[list[int]], starts: list[int], changed=(), requests=None, page_size=2):
    """`SteadyDecode.follow` for a step at `starts` after one at `starts - 1` over the same
    requests (or `requests`, a reordering or subset of them)."""
    from pegboard.core.page_tables import PageTableMirror
    from pegboard.core.steady_decode import SteadyDecode

    steady, mirror = SteadyDecode(torch.device("cpu")), PageTableMirror()
    first = [Request([1]) for _ in tables]
    for r, t in zip(first, tables):
        r.page_table = list(t)
    before = np.asarray(starts, dtype=np.int64) - 1
    pages = before // page_size + 1
    mirror.gather(first, pages)
    steady.record(ForwardBatch(first, *[None] * 3, [1] * len(first), [], [], None), before, pages)
    for i, page in changed:
        first[i].page_table[-1] = page  # a prefix cache swapped in an identical cached page
    now = first if requests is None else [first[i] for i in requests]
    at = np.asarray(starts if requests is None else [starts[i] for i in requests], np.int64)
    num_pages = at // page_size + 1
    table = mirror.gather(now, num_pages)
    return steady.follow(now, at, num_pages, table, mirror.changed)


def test_a_request_starting_a_page_allocated_earlier_gets_its_row_written():
    step = _continue([[5, 6], [7]], starts=[2, 1])  # request 0 crosses into page 6
    assert step.rows is None
    assert step.page_updates.tolist() == [[0, 5, 6]]


def test_a_page_swapped_in_place_gets_its_row_written_without_a_crossing():
    step = _continue([[5, 6], [7]], starts=[3, 1], changed=[(0, 9)])
    assert step.page_updates.tolist() == [[0, 5, 9]]


def test_nothing_changed_but_the_lengths():
    step = _continue([[5, 6], [7]], starts=[3, 1])
    assert step.rows is None and step.page_updates is None


def test_requests_that_left_give_the_rows_of_the_others():
    step = _continue([[5, 8], [6], [7]], starts=[2, 1, 1], requests=[2, 0])
    assert step.rows.tolist() == [2, 0]
    assert step.page_updates.tolist() == [[1, 5, 8]]  # request 0, now row 1


def test_a_step_that_is_not_one_token_further_does_not_continue():
    from pegboard.core.steady_decode import SteadyDecode

    steady = SteadyDecode(torch.device("cpu"))
    requests = [Request([1]), Request([2])]
    last = ForwardBatch(requests, *[None] * 3, [1, 1], [], [], None)
    steady.record(last, np.array([3, 5]), np.array([2, 3]))
    table = np.array([[1, 2, 0], [3, 4, 5]], dtype=np.int32)
    pages = np.array([2, 3])
    assert steady.follow(requests, np.array([4, 6]), pages, table, []).previous is last
    assert steady.follow(requests, np.array([4, 5]), pages, table, []) is None  # one stalled
    joined = [*requests, Request([3])]
    assert steady.follow(joined, np.array([4, 6, 0]), np.array([2, 3, 1]), table, []) is None
    steady.reset()
    assert steady.follow(requests, np.array([4, 6]), pages, table, []) is None


def test_the_steady_step_is_off_by_default(monkeypatch):
    from pegboard.core.steady_decode import SteadyDecode

    monkeypatch.delenv("PEGBOARD_STEADY_DECODE")
    steady = SteadyDecode(torch.device("cpu"))
    requests = [Request([1])]
    steady.record(
        ForwardBatch(requests, *[None] * 3, [1], [], [], None), np.array([3]), np.array([1])
    )
    assert (
        steady.follow(requests, np.array([4]), np.array([1]), np.zeros((1, 1), np.int32), [])
        is None
    )
