"""`--detokenizer process` (`pegboard.core.detokenizer_process`): the detokenizer in a process
of its own streams exactly the deltas of the inline one; its death fails the requests with an
error naming it, never hangs; closing the engine ends it; the worker fails only the request
whose tokenizer call raised."""

from __future__ import annotations

import os
import pickle
import random
import signal

import pytest
from fixtures.processes import detokenizer_children
from pegboard.core.detokenizer_process import DetokenizerLost, DetokenizerProcess
from pegboard.core.detokenizer_states import DROP, FAIL, DetokenizerStates
from pegboard.core.detokenizer_worker import (
    FINISHED,
    FLUSH,
    detokenize_step,
    encode_step,
    new_request,
)
from pegboard.core.llm import LLM
from pegboard.sdk.types import FinishReason, Request, SamplingParams

SMALL = dict(dtype="float32", kv_cache_tokens=4096)
GREEDY = dict(temperature=0.0, max_tokens=20, ignore_eos=True)


def prompts_for(vocab: int, n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, vocab) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def stream(
    llm: LLM, prompts, params, at_step=None, last: str = "new_logprobs"
) -> tuple[list[list[tuple]], list[Request]]:
    """Every request's deltas as (token ids, text, finished, finish reason, and the output's
    attribute `last`: its logprobs by default), stepping as `LLM.run` does; `at_step[k](llm,
    requests)` runs before step k (aborts, swaps)."""
    requests = [Request(list(p), sp) for p, sp in zip(prompts, params)]
    for r in requests:
        llm.engine.add_request(r)
    deltas: dict[str, list] = {r.request_id: [] for r in requests}
    engine, detokenizer, step = llm.engine, llm.engine.detokenizer, 0
    while engine.has_work() or detokenizer.busy():
        if engine.has_work():
            if at_step and step in at_step:
                at_step[step](llm, requests)
            engine.step()
            step += 1
        for out in detokenizer.take(wait=not engine.has_work()):
            deltas[out.request_id].append(
                (out.new_token_ids, out.text, out.finished, out.finish_reason, getattr(out, last))
            )
    return [deltas[r.request_id] for r in requests], requests


def abort_first(llm: LLM, requests: list[Request]) -> None:
    llm.engine.abort(requests[0].request_id)


def workload(llm: LLM) -> tuple[list, list[SamplingParams]]:
    """Greedy requests, some with stop strings cut from the middle of their free output (so
    the engine learns of them late), some with logprobs, one sampled with a seed."""
    prompts = prompts_for(200, 10)
    free = llm.generate(prompts, SamplingParams(**GREEDY))
    params = []
    for i, o in enumerate(free):
        stop = [o.text[5:8]] if i % 2 == 0 and len(o.text) > 10 else []
        params.append(SamplingParams(stop=stop, logprobs=2 if i % 3 == 0 else None, **GREEDY))
    params[-1] = SamplingParams(temperature=1.0, seed=7, max_tokens=20, ignore_eos=True)
    return prompts, params


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param(  # several tokens a step; the same steps draft in both runs (on CUDA
            # the speed rule would pick them by the clock)
            {"speculator": "ngram", "speculative_min_speedup": 0.0},
            id="ngram-speculation",
        ),
        pytest.param(
            {
                "max_num_batched_tokens": 32,
                "swaps": {3: ("scheduler", "sjf"), 5: ("attention", "torch")},
            },
            id="swaps",
        ),
    ],
)
def test_process_streams_the_deltas_of_the_inline_detokenizer(tiny_llama_dir, settings):
    settings = dict(settings)
    swaps = settings.pop("swaps", {})
    at_step = {2: abort_first} | {k: lambda llm, _, s=s: llm.swap(*s) for k, s in swaps.items()}
    with LLM(str(tiny_llama_dir), **SMALL, **settings) as llm:
        prompts, params = workload(llm)
        inline, _ = stream(llm, prompts, params, at_step)
    with LLM(str(tiny_llama_dir), **SMALL, **settings, detokenizer="process") as llm:
        process, requests = stream(llm, prompts, params, at_step)
        engine = llm.engine
        assert not engine.has_work() and not engine.detokenizer.busy()
        assert engine.kv.num_free_pages == engine.kv.num_pages
        for slot, name in swaps.values():
            assert engine.plugins.active(slot).name == name
        if "speculator" in settings:  # drafts were accepted: steps of several tokens
            assert engine.speculation.stats()["spec_accepted_tokens"] > 0
    stopped = [r for r in requests if r.params.stop and r.num_output_tokens < GREEDY["max_tokens"]]
    assert stopped  # stop strings ended requests early, found by the process
    assert requests[0].finish_reason is FinishReason.ABORT
    assert any(not text and ids for d in process for ids, text, *_ in d[:-1])  # held-back bytes
    assert any(ord(c) > 127 for d in process for _, text, *_ in d for c in text)  # multi-byte
    for got, want in zip(process, inline):
        assert [d[:4] for d in got] == [d[:4] for d in want]  # ids, text, finished, reason
        for (*_, got_lps), (*_, want_lps) in zip(got, want):
            assert [lp.token_id for lp in got_lps] == [lp.token_id for lp in want_lps]
            assert [lp.logprob for lp in got_lps] == pytest.approx(
                [lp.logprob for lp in want_lps], abs=1e-4
            )


def test_a_killed_process_fails_its_requests_naming_it_and_the_later_ones(tiny_llama_dir):
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer="process") as llm:
        detokenizer = llm.engine.detokenizer
        prompts = prompts_for(200, 4)
        requests = [Request(p, SamplingParams(max_tokens=200, ignore_eos=True)) for p in prompts]
        for r in requests:
            llm.engine.add_request(r)
        outs = []
        for out in llm.run():
            outs.append(out)
            if len(outs) == 1:  # it works: now kill it mid-run
                os.kill(detokenizer.process.pid, signal.SIGKILL)
        message = f"the detokenizer process (pid {detokenizer.process.pid}) exited with status -9"
        finals = {o.request_id: o for o in outs if o.finished}
        assert sorted(finals) == sorted(r.request_id for r in requests)  # each ended once
        assert all(o.finish_reason is FinishReason.ERROR for o in finals.values())
        assert all(message in o.error for o in finals.values())
        assert all(r.finish_reason is FinishReason.ERROR for r in requests)
        later = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3))
        assert later[0].finish_reason is FinishReason.ERROR and message in later[0].error
        assert llm.engine.kv.num_free_pages == llm.engine.kv.num_pages


def test_the_process_outlives_sigterm_and_ends_with_the_engine(tiny_llama_dir):
    """A draining server (SIGTERM to its process group) still gets its text; `close` ends it."""
    with LLM(str(tiny_llama_dir), **SMALL, detokenizer="process") as llm:
        process = llm.engine.detokenizer.process
        os.kill(process.pid, signal.SIGTERM)
        out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert out.finish_reason is FinishReason.LENGTH
        assert out.text == llm.tokenizer.decode(out.token_ids)
    assert process.poll() is not None


@pytest.mark.slow  # a whole start of the process (torch's import) only to see it fail
def test_a_process_that_cannot_start_is_an_error_naming_it(tmp_path):
    (tmp_path / "config.json").write_text("{}")  # no tokenizer files
    with pytest.raises(
        DetokenizerLost,
        match=r"detokenizer process \(pid \d+\) exited with status 1 while starting",
    ):
        DetokenizerProcess(tmp_path, allow_missing=False, on_stop=lambda *a: None)


class RaisingTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        if 13 in ids:
            raise RuntimeError("bad vocabulary entry")
        return "".join(f"<{i}>" for i in ids)


def test_the_worker_fails_only_the_request_whose_decode_raised():
    states, opening = DetokenizerStates(RaisingTokenizer()), {}
    bad, good = Request([1, 2], SamplingParams()), Request([3, 4], SamplingParams())
    step = encode_step([new_request(0, bad), new_request(1, good)], [0, 1, 0, 1, 1, 0], [13, 5])
    texts, events, picks = pickle.loads(detokenize_step(states, opening, step))
    assert texts == ["", "<5>"] and picks is None  # every delta is delivered
    assert events[0][:2] == (0, FAIL) and "bad vocabulary entry" in events[0][2]
    # its later deltas are dropped until the engine's last one; the other request goes on
    step = encode_step([], [0, 1, 0, 1, 1, FINISHED | FLUSH, 0, 0, FINISHED], [6, 7])
    texts, events, picks = pickle.loads(detokenize_step(states, opening, step))
    assert texts == ["", "<7>", ""] and picks is None
    assert events == [(0, DROP, None), (2, DROP, None)]


def test_auto_places_the_detokenizer_in_a_process_only_on_cuda(tiny_llama_dir):
    """`--detokenizer auto` (the default): a process of its own where the step loop's host
    work is the bottleneck (a CUDA device), inline on the CPU; an explicit choice stands."""
    from pegboard.core.detokenizer_process import detokenizer_place

    assert detokenizer_place("auto", "cuda:1") == "process"
    assert detokenizer_place("auto", "cpu") == "inline"
    assert detokenizer_place("thread", "cuda") == "thread"
    llm = LLM(tiny_llama_dir, **SMALL)  # the default config on the CPU
    try:
        assert not isinstance(llm.engine.detokenizer, DetokenizerProcess)
    finally:
        llm.close()


@pytest.mark.gpu
def test_auto_on_cuda_runs_the_process_and_streams_like_inline(tiny_llama_dir):
    prompts = prompts_for(200, 4)
    texts = {}
    for where in ("auto", "inline"):
        llm = LLM(tiny_llama_dir, device="cuda", detokenizer=where, **SMALL)
        try:
            if where == "auto":
                assert isinstance(llm.engine.detokenizer, DetokenizerProcess)
            texts[where] = [o.text for o in llm.generate(prompts, SamplingParams(**GREEDY))]
        finally:
            llm.close()
    assert texts["auto"] == texts["inline"]


def test_the_process_starts_before_the_model_loads_and_ends_if_the_load_fails(tmp_path):
    """The engine starts the process first (its imports overlap the model's load) and waits
    for it only after; an engine whose model then fails to load leaves no process behind."""
    import gc
    import time

    from pegboard.core.detokenizer_process import spawn_detokenizer
    from pegboard.core.models.errors import ModelLoadError

    assert spawn_detokenizer("inline", tmp_path, True, print) is None
    before = set(detokenizer_children(os.getpid()))
    (tmp_path / "config.json").write_text('{"architectures": ["NoSuchModel"]}')
    with pytest.raises(ModelLoadError):
        LLM(tmp_path, detokenizer="process", load_format="dummy")
    started = set(detokenizer_children(os.getpid())) - before
    assert started, "the process was started before the model load failed"
    gc.collect()  # the half-built engine's end of the pipes closes: the process sees EOF
    deadline = time.monotonic() + 120  # it first finishes importing torch
    while started & set(detokenizer_children(os.getpid())) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not started & set(detokenizer_children(os.getpid()))
