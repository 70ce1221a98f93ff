"""Overlap scheduling (`pegboard.core.overlap`): a step's tokens are read one step later, and
outputs are identical with `disable_overlap` on or off."""

from __future__ import annotations

import random

import pytest
from fixtures.devices import GPU_ENGINE
from pegboard.core.llm import LLM
from pegboard.core.overlap import PENDING_TOKEN
from pegboard.sdk.types import Request, SamplingParams


def prompts_for(vocab: int, n: int = 12, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(3, 60))] for _ in range(n)]


def run(model_dir, prompts, params, **engine) -> list[tuple[list[int], str]]:
    with LLM(str(model_dir), dtype="float32", **engine) as llm:
        outs = llm.generate(prompts, params, progress=False)
        assert not llm.engine.has_work()
        assert not llm.engine.running and llm.engine.kv.num_free_pages == llm.engine.kv.num_pages
        return [(o.token_ids, o.text) for o in outs]


CASES = {
    "greedy": ({}, dict(temperature=0.0, max_tokens=16)),
    "seeded sampling": ({}, dict(temperature=0.8, top_p=0.9, max_tokens=16)),
    "penalties": ({}, dict(temperature=0.0, max_tokens=16, repetition_penalty=1.3)),
    "chunked prefill": ({"max_num_batched_tokens": 24}, dict(temperature=0.0, max_tokens=12)),
    "preemption": ({"kv_cache_tokens": 160, "page_size": 4}, dict(temperature=0.7, max_tokens=24)),
    "radix": ({"kv_cache": "radix", "page_size": 1}, dict(temperature=0.0, max_tokens=12)),
    "logprobs": ({}, dict(temperature=0.0, max_tokens=8, logprobs=2)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_outputs_equal_with_and_without_overlap(tiny_llama_dir, case):
    engine, sampling = CASES[case]
    prompts = prompts_for(200)
    if case == "radix":  # shared prefixes, so requests hit each other's cached pages
        prompts = [prompts[0][:40] + p[:8] for p in prompts]
    params = [SamplingParams(seed=i, **sampling) for i in range(len(prompts))]
    on = run(tiny_llama_dir, prompts, params, **engine)
    off = run(tiny_llama_dir, prompts, params, disable_overlap=True, **engine)
    assert on == off
    assert all(len(ids) > 0 for ids, _ in on)


def test_stop_strings_and_eos_stop_at_the_same_token(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), dtype="float32") as llm:
        free = llm.generate(prompts_for(200, 4), SamplingParams(temperature=0.0, max_tokens=20))
    stops = [o.text[3:5] for o in free if len(o.text) > 6]
    assert stops
    params = SamplingParams(temperature=0.0, max_tokens=20, stop=stops)
    on = run(tiny_llama_dir, prompts_for(200, 4), params)
    off = run(tiny_llama_dir, prompts_for(200, 4), params, disable_overlap=True)
    assert on == off
    assert any(len(ids) < 20 for ids, _ in on)  # some stopped early at a stop string


def test_tokens_reach_the_host_one_step_later(tiny_llama_dir):
    """With overlap, step N+1 is prepared and launched before step N's tokens are read."""
    with LLM(str(tiny_llama_dir), dtype="float32") as llm:
        engine = llm.engine
        seen = []
        forward = engine.runner.forward

        def spy(batch):
            pending = engine._pending
            seen.append(None if pending is None else pending.host_ids)
            return forward(batch)

        engine.runner.forward = spy
        engine.add_request(Request([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3)))
        first = engine.step()  # prefill: its token stays on the device
        assert first == []
        r = engine.running[0]
        assert r.token_ids[-1] == PENDING_TOKEN and r.output_token_ids == []
        second = engine.step()  # decode launched, then the prefill's token is read
        assert [o.new_token_ids for o in second] == [[r.output_token_ids[0]]]
        assert seen == [None, None]  # the decode was launched before that token was read
        assert r.token_ids[-1] == PENDING_TOKEN
        while engine.has_work():
            engine.step()
        assert len(r.output_token_ids) == 3 and PENDING_TOKEN not in r.token_ids


def test_without_overlap_tokens_arrive_in_their_own_step(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), dtype="float32", disable_overlap=True) as llm:
        engine = llm.engine
        engine.add_request(Request([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=3)))
        assert len(engine.step()) == 1
        assert engine._pending is None


def decoding_with_a_token_pending(engine, n: int) -> list[Request]:
    """`n` greedy requests sharing a prefix, stepped until a decode token is in flight."""
    reqs = [
        Request([5, 6, 7, 8, 9, 10 + i], SamplingParams(temperature=0.0, max_tokens=50))
        for i in range(n)
    ]
    for r in reqs:
        engine.add_request(r)
    engine.step()
    engine.step()
    assert engine._pending is not None
    return reqs


def assert_no_cached_placeholder(engine) -> None:
    cached = [t for node in engine.kv.tree.nodes() for t in node.key]
    assert cached and PENDING_TOKEN not in cached


def test_abort_while_a_token_is_pending_frees_everything(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), dtype="float32", kv_cache="radix", page_size=1) as llm:
        engine = llm.engine
        reqs = decoding_with_a_token_pending(engine, 4)
        engine.abort(reqs[0].request_id)
        outs = engine.step()
        assert any(o.request_id == reqs[0].request_id and o.finished for o in outs)
        assert PENDING_TOKEN not in reqs[0].token_ids
        while engine.has_work():
            engine.step()
        assert all(PENDING_TOKEN not in r.token_ids for r in reqs)
        assert_no_cached_placeholder(engine)
        assert engine.kv.num_free_pages == engine.kv.num_pages


@pytest.mark.gpu
def test_overlap_on_the_gpu_with_cuda_graphs(tiny_llama_dir):
    """bf16 on CUDA, decode replayed from graphs: the same tokens with overlap on and off
    (requests finish together, so both runs see the same batches)."""
    prompts = prompts_for(200, 24)
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    outs = {}
    for off in (False, True):
        # graphs for the 24 requests (their 788 prompt tokens in one mixed-graph step),
        # the detokenizer inline (GPU_ENGINE in tests/fixtures/devices.py)
        with LLM(
            str(tiny_llama_dir), dtype="bfloat16", disable_overlap=off, kv_cache_tokens=8192,
            cuda_graph_max_bs=24, cuda_graph_mixed_max_tokens=1024, **GPU_ENGINE,
        ) as llm:  # fmt: skip
            assert llm.engine.runner.cuda_graphs is not None
            replays = llm.engine.runner.cuda_graphs.num_replays
            outs[off] = [o.token_ids for o in llm.generate(prompts, params, progress=False)]
            assert llm.engine.runner.cuda_graphs.num_replays - replays >= 19
    assert outs[False] == outs[True]


def test_a_forward_that_fails_while_a_token_is_pending_caches_no_placeholder(tiny_llama_dir):
    """The failing step's requests end with an error; their pending tokens (from the step
    before) are dropped, never inserted into the prefix cache as tokens."""
    with LLM(str(tiny_llama_dir), dtype="float32", kv_cache="radix", page_size=1) as llm:
        engine = llm.engine
        reqs = decoding_with_a_token_pending(engine, 3)
        forward = engine.runner.forward

        def broken(batch):
            engine.runner.forward = forward
            raise RuntimeError("kernel exploded")

        engine.runner.forward = broken
        outs = engine.step()
        while engine.has_work():
            outs += engine.step()
        assert all(r.finish_reason.value == "error" for r in reqs)
        assert all("kernel exploded" in r.error for r in reqs)
        assert all(PENDING_TOKEN not in r.token_ids for r in reqs)
        assert_no_cached_placeholder(engine)
        assert engine.kv.num_free_pages == engine.kv.num_pages
