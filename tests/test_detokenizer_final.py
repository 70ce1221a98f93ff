"""`SamplingParams.output_kind="final"`: with every detokenizer placement a final request gets
no output until it ends, then exactly one, whose text is what its deltas concatenate to (stop
strings, held-back multi-byte characters, max tokens, an abort, a failing tokenizer); the
delta requests beside it stream as before; `LLM.generate` (which uses it) returns the text
`run()`'s deltas make; and a step of final requests costs the engine's process one output per
request, not one per request per step."""

from __future__ import annotations

import os
import pickle
import signal

import pytest
from fixtures.tokenizer import break_decoding
from pegboard.core import detokenizer_process, detokenizer_thread
from pegboard.core.detokenizer_states import FAIL, STOP, DetokenizerStates
from pegboard.core.detokenizer_worker import (
    FINISHED,
    FLUSH,
    detokenize_step,
    encode_step,
    new_request,
)
from pegboard.core.llm import LLM
from pegboard.sdk.types import FinishReason, Request, SamplingParams
from test_detokenizer_process import GREEDY, SMALL, RaisingTokenizer, abort_first, prompts_for
from test_detokenizer_process import stream as stream_deltas

PLACEMENTS = ["inline", "thread", "process"]


def as_kind(params: SamplingParams, kind: str) -> SamplingParams:
    return SamplingParams(**{**vars(params), "output_kind": kind})


def stream(llm: LLM, prompts, params, abort_at: int | None = 2) -> list[list[tuple]]:
    """Every request's outputs as (token ids, text, finished, finish reason, error), stepping
    as `LLM.run` does; the first request is aborted before step `abort_at`. Every page is
    free after."""
    at_step = None if abort_at is None else {abort_at: abort_first}
    outs, _ = stream_deltas(llm, prompts, params, at_step, last="error")
    assert llm.engine.kv.num_free_pages == llm.engine.kv.num_pages
    return outs


def workload(llm: LLM) -> tuple[list, list[SamplingParams]]:
    """Greedy requests, half with a stop string cut from the middle of their free output, one
    with a short max_tokens, one sampled with a seed (the first one is aborted)."""
    prompts = prompts_for(200, 10)
    free = llm.generate(prompts, SamplingParams(**GREEDY))
    params = []
    for i, o in enumerate(free):
        stop = [o.text[5:8]] if i % 2 == 0 and len(o.text) > 10 else []
        params.append(SamplingParams(stop=stop, **GREEDY))
    params[1] = SamplingParams(**{**GREEDY, "max_tokens": 3})
    params[-1] = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    return prompts, params


def assert_final_matches(final: list[tuple], deltas: list[tuple]) -> None:
    """One output, finished as the deltas ended, with their concatenated text."""
    assert len(final) == 1
    ids, text, finished, reason, error = final[0]
    assert finished and reason is deltas[-1][3] and error == deltas[-1][4]
    assert text == "".join(d[1] for d in deltas)
    assert ids == deltas[-1][0]  # the last step's tokens, as the last delta's


@pytest.mark.parametrize("detokenizer", PLACEMENTS)
def test_a_final_request_gets_one_output_with_the_text_its_deltas_make(tiny_llama_dir, detokenizer):
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        prompts, params = workload(llm)
        deltas = stream(llm, prompts, params)
        finals = stream(llm, prompts, [as_kind(p, "final") for p in params])
        kinds = ["final" if i % 2 else "delta" for i in range(len(params))]
        mixed = stream(llm, prompts, [as_kind(p, k) for p, k in zip(params, kinds)])
    reasons = [d[-1][3] for d in deltas]
    assert reasons[0] is FinishReason.ABORT
    assert FinishReason.LENGTH in reasons
    stopped = [i for i, p in enumerate(params) if p.stop and len(deltas[i]) < GREEDY["max_tokens"]]
    assert stopped  # stop strings ended requests early (their text cut before the stop)
    assert any(not text and ids for d in deltas for ids, text, *_ in d[:-1])  # held-back bytes
    assert any(ord(c) > 127 for d in deltas for _, text, *_ in d for c in text)  # multi-byte
    for final, delta in zip(finals, deltas):
        assert_final_matches(final, delta)
    for kind, got, delta in zip(kinds, mixed, deltas):
        if kind == "final":
            assert_final_matches(got, delta)
        else:
            assert got == delta  # the delta requests beside final ones stream as before


@pytest.mark.parametrize("detokenizer", ["inline", "thread"])  # process: the worker test below
def test_a_final_request_whose_tokenizer_raises_ends_once_with_the_error(
    tiny_llama_dir, detokenizer
):
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        break_decoding(llm)  # the first request's prompt context
        params = SamplingParams(max_tokens=5, ignore_eos=True, output_kind="final")
        outs = stream(llm, [[13, 14, 15], [20, 21, 22]], [params, params], abort_at=None)
    assert len(outs[0]) == 1 and outs[0][0][3] is FinishReason.ERROR
    assert "bad vocabulary entry" in outs[0][0][4] and outs[0][0][1] == ""
    assert len(outs[1]) == 1 and outs[1][0][3] is FinishReason.LENGTH


def test_the_worker_answers_only_the_final_requests_that_ended_with_their_whole_text():
    """A step of final requests none of which ended answers nothing per request; the step
    that ends one (a failure mid-output, a stop string, a token stop) answers only it."""
    states, opening = DetokenizerStates(RaisingTokenizer()), {}
    final = SamplingParams(output_kind="final", stop=["<9>"])
    requests = [Request([1, 2], final) for _ in range(4)]
    new = [new_request(slot, r) for slot, r in enumerate(requests)]
    step = encode_step(new, [s for slot in range(4) for s in (slot, 1, 0)], [5, 6, 7, 8])
    assert pickle.loads(detokenize_step(states, opening, step)) == ([], [], [])
    quiet = encode_step([], [s for slot in range(4) for s in (slot, 1, 0)], [6, 7, 8, 5])
    assert pickle.loads(detokenize_step(states, opening, quiet)) == ([], [], [])
    # slot 0 fails, slot 1 meets its stop string, slot 2 ends on a token, slot 3 goes on
    heads = [0, 1, 0, 1, 1, 0, 2, 1, FINISHED | FLUSH, 3, 1, 0]
    texts, events, picks = pickle.loads(
        detokenize_step(states, opening, encode_step([], heads, [13, 9, 4, 4]))
    )
    assert picks == [0, 1, 2]
    assert texts == ["<5><6>", "<6><7>", "<7><8><4>"]  # what their deltas concatenate to
    assert [e[:2] for e in events] == [(0, FAIL), (1, STOP)]
    assert events[1][2] == 3  # the stop string's token: the output's third


def test_a_step_of_final_requests_answers_the_same_few_bytes_however_many_there_are():
    sizes = []
    for n in (1, 200):
        states, opening = DetokenizerStates(RaisingTokenizer()), {}
        new = [
            new_request(s, Request([1, 2], SamplingParams(output_kind="final"))) for s in range(n)
        ]
        heads = [h for slot in range(n) for h in (slot, 1, 0)]
        sizes.append(len(detokenize_step(states, opening, encode_step(new, heads, [5] * n))))
    assert sizes[0] == sizes[1]


@pytest.mark.parametrize("detokenizer", PLACEMENTS)
def test_final_requests_build_one_output_each_not_one_per_step(
    tiny_llama_dir, detokenizer, monkeypatch
):
    """The engine's side builds an output object (`with_text`) only for the end of each final
    request: N of them over S steps cost N, where deltas cost about N × S."""
    built = []
    for module in (detokenizer_thread, detokenizer_process):
        real = module.with_text

        def counting(out, text, real=real):
            built.append(out.request_id)
            return real(out, text)

        monkeypatch.setattr(module, "with_text", counting)
    prompts = prompts_for(200, 6)
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        outs = stream(llm, prompts, [SamplingParams(**GREEDY, output_kind="final")] * 6, None)
        assert len(built) == 6 and sorted(built) == sorted(set(built))
        assert [len(o) for o in outs] == [1] * 6
        built.clear()
        stream(llm, prompts, [SamplingParams(**GREEDY)] * 6, None)
        assert len(built) >= 6 * GREEDY["max_tokens"]  # the delta path: one per step


@pytest.mark.parametrize("detokenizer", PLACEMENTS)
def test_generate_returns_the_text_run_streams(tiny_llama_dir, detokenizer):
    prompts = prompts_for(200, 5, seed=3)
    params = [SamplingParams(**GREEDY, stop=["e"] if i % 2 else []) for i in range(5)]
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer=detokenizer) as llm:
        deltas = stream(llm, prompts, params, abort_at=None)
        results = llm.generate(prompts, params)
    assert [o.text for o in results] == ["".join(d[1] for d in ds) for ds in deltas]
    assert [o.token_ids for o in results] == [[t for d in ds for t in d[0]] for ds in deltas]
    assert [o.finish_reason for o in results] == [ds[-1][3] for ds in deltas]
    assert all(p.output_kind == "delta" for p in params)  # the caller's params are untouched


def test_a_killed_process_ends_each_final_request_once_with_its_error(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer="process") as llm:
        detokenizer = llm.engine.detokenizer
        params = SamplingParams(max_tokens=200, ignore_eos=True, output_kind="final")
        requests = [Request(p, params) for p in prompts_for(200, 4)]
        for r in requests:
            llm.engine.add_request(r)
        llm.engine.step()
        os.kill(detokenizer.process.pid, signal.SIGKILL)
        outs = list(llm.run())
    message = f"the detokenizer process (pid {detokenizer.process.pid}) exited with status -9"
    assert sorted(o.request_id for o in outs) == sorted(r.request_id for r in requests)
    assert all(o.finished and o.finish_reason is FinishReason.ERROR for o in outs)
    assert all(message in o.error for o in outs)


def test_an_unknown_output_kind_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"output_kind must be one of \('delta', 'final'\)"):
        SamplingParams(output_kind="bogus")


def test_the_progress_bar_of_generate_counts_each_finished_request_once(
    tiny_llama_dir, monkeypatch
):
    import pegboard.core.llm as llm_module

    counted = []

    class Bar:
        def __init__(self, total, disable, desc):
            self.total = total

        def update(self, n):
            counted.append(n)

        def close(self):
            pass

    monkeypatch.setattr(llm_module, "tqdm", Bar)
    with LLM(str(tiny_llama_dir), **SMALL) as llm:
        llm.generate(prompts_for(200, 4), SamplingParams(**GREEDY), progress=True)
    assert counted == [1] * 4
