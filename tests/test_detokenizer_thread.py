"""Detokenization off the step loop (`pegboard.core.detokenizer_thread`): the text, the stop
strings and the streamed deltas are those of an inline detokenizer, although the engine learns
of a stop string a step or two late; and the CPU runner's intra-op thread limit."""

from __future__ import annotations

import random

import pytest
import torch
from fixtures.tokenizer import break_decoding
from pegboard.core.detokenizer import Detokenizer
from pegboard.core.llm import LLM
from pegboard.sdk.types import FinishReason, Request, SamplingParams

#: A KV cache sized in tokens: on a GPU the engines of consecutive tests need not wait for the
#: garbage collector to return the memory of the previous one.
SMALL = dict(dtype="float32", kv_cache_tokens=4096)


def prompts_for(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(3, 40))] for _ in range(n)]


def inline(tokenizer, prompt: list[int], ids: list[int], params: SamplingParams):
    """What detokenizing inside the step produced: (token ids up to the stop, text, pieces)."""
    detok = Detokenizer(tokenizer, params, prompt)
    pieces = []
    for i, token in enumerate(ids):
        pieces.append(detok.add([token]))
        if detok.stop_reason:
            return ids[: i + 1], "".join(pieces), pieces
    pieces.append(detok.flush())
    return ids, "".join(pieces), pieces


@pytest.mark.parametrize("detokenizer", ["thread", "inline", "process"])
def test_stop_string_found_late_reports_the_inline_ids_text_and_deltas(tiny_llama_dir, detokenizer):
    """The engine runs a request on past its stop string; the outputs are trimmed back to the
    token that completed it, every page is freed, and the stream's deltas are the inline ones."""
    prompts = prompts_for(200, 6)
    greedy = dict(temperature=0.0, max_tokens=24, ignore_eos=True)
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        free = llm.generate(prompts, SamplingParams(**greedy))
        cases = [(p, o) for p, o in zip(prompts, free) if len(o.text) > 12]
        assert cases
        # stop strings that complete in the middle of the output, several tokens before its end
        params = [SamplingParams(stop=[o.text[6:9]], logprobs=1, **greedy) for _, o in cases]
        expected = [inline(llm.tokenizer, p, o.token_ids, sp) for (p, o), sp in zip(cases, params)]
        assert any(len(ids) < len(o.token_ids) for (ids, _, _), (_, o) in zip(expected, cases))
        requests = [Request(list(p), sp) for (p, _), sp in zip(cases, params)]
        for r in requests:
            llm.engine.add_request(r)
        deltas: dict[str, list] = {r.request_id: [] for r in requests}
        for out in llm.run():
            deltas[out.request_id].append(out)
        engine = llm.engine
        assert not engine.has_work() and not engine.detokenizer.busy()
        assert engine.kv.num_free_pages == engine.kv.num_pages
    for r, (ids, text, pieces) in zip(requests, expected):
        outs = deltas[r.request_id]
        assert r.output_token_ids == ids
        assert len(r.output_logprobs) == len(ids)
        assert r.finish_reason is FinishReason.STOP
        assert [t for o in outs for t in o.new_token_ids] == ids  # later tokens never streamed
        assert "".join(o.text for o in outs) == text
        assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
        assert outs[-1].finish_reason is FinishReason.STOP
        assert [o.text for o in outs if o.new_token_ids] == pieces[: len(ids)]


@pytest.mark.parametrize("detokenizer", ["thread", "inline", "process"])
def test_step_returns_token_deltas_and_the_detokenizer_the_text(tiny_llama_dir, detokenizer):
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        engine = llm.engine
        r = Request([5, 6, 7, 8], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        engine.add_request(r)
        steps = []
        while engine.has_work():
            steps += engine.step()
        texts = []
        while engine.detokenizer.busy():
            texts += engine.detokenizer.take(wait=True)
    assert all(o.text == "" for o in steps)
    assert [t for o in steps for t in o.new_token_ids] == r.output_token_ids
    assert "".join(o.text for o in texts) == llm.tokenizer.decode(r.output_token_ids)
    assert texts[-1].finished and texts[-1].finish_reason is FinishReason.LENGTH


@pytest.mark.parametrize("detokenizer", ["thread", "inline"])  # process: test_detokenizer_process
def test_a_tokenizer_that_raises_fails_only_its_requests(tiny_llama_dir, detokenizer):
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        break_decoding(llm)  # the first request's prompt context
        outs = llm.generate(
            [[13, 14, 15], [20, 21, 22]], SamplingParams(max_tokens=5, ignore_eos=True)
        )
        assert not llm.engine.has_work()
        assert llm.engine.kv.num_free_pages == llm.engine.kv.num_pages
    assert outs[0].finish_reason is FinishReason.ERROR
    assert "bad vocabulary entry" in outs[0].error
    assert outs[1].finish_reason is FinishReason.LENGTH and len(outs[1].token_ids) == 5


@pytest.mark.parametrize(
    ("tokens", "threads"), [([1], 1), ([40, 1, 1], 1), ([1 << 20], 2)], ids=str
)
def test_cpu_steps_use_intra_op_threads_only_for_enough_work(tiny_llama_dir, tokens, threads):
    """The tiny model's steps run single-threaded on a CPU (OpenMP's fork/join costs more than
    they take; a busy machine stalls every op); torch's setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with LLM(str(tiny_llama_dir), dtype="float32", device="cpu") as llm:
            with llm.engine.runner.host_threads(tokens):
                inside = torch.get_num_threads()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert inside == threads


def test_engine_forward_runs_with_the_limited_threads(tiny_llama_dir):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with LLM(str(tiny_llama_dir), dtype="float32", device="cpu") as llm:
            seen = []
            forward = llm.engine.runner.forward

            def spy(batch):
                seen.append(torch.get_num_threads())
                return forward(batch)

            llm.engine.runner.forward = spy
            llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
    finally:
        torch.set_num_threads(before)
    assert seen and set(seen) == {1}
