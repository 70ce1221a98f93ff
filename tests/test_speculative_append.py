"""A verify step's tokens are appended at once (`Engine._append` with a list: the accepted
drafts and the target's token, cut at the first that stops the request by `first_stop`), the
same code path as a plain step's one token. So, with drafts partly or wholly accepted, every
request ends as without drafts: the same tokens, text, finish reason and logprobs, for stop
tokens inside an accepted chain, `max_tokens` reached mid-chain, stop strings and EOS; its
deltas carry exactly its output (one per request and step, `finished` on the last one) and its
first-token time is set."""

from __future__ import annotations

import random

import pytest
import test_speculative
from pegboard.core.llm import LLM
from pegboard.core.outputs import first_stop
from pegboard.sdk.types import FinishReason, Request, SamplingParams
from test_speculative import MAX_NEW, oracle_plugins

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs


def _params(reference, texts) -> list[SamplingParams]:
    """Per prompt a way to stop inside a chain of drafts: a stop token (output token 6), a
    `max_tokens` of 7 or 11, a stop string (three characters of the middle of the plain text),
    an EOS (output token 9 declared one: `_eos`), and logprobs (with and without top
    alternatives) on some."""
    out = []
    for i, (ref, text) in enumerate(zip(reference, texts)):
        kind = i % 4
        p = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, logprobs=(None, 2, 0)[i % 3])
        if kind == 0:
            p.stop_token_ids = [ref[6]]
        elif kind == 1:
            p.max_tokens = 7 if i < 4 else 11
        elif kind == 2:
            middle = len(text) // 2
            p.stop = [text[middle : middle + 3]]
        out.append(p)
    return out


def _eos(reference) -> dict[int, list[int]]:
    """Prompt index -> its EOS ids: output token 9 for the kind-3 prompts (`_params`)."""
    return {i: [ref[9]] for i, ref in enumerate(reference) if i % 4 == 3}


def _run(model_dir, prompts, params, eos, plugins=None, **settings):
    """Step an engine over the prompts: the requests, the deltas per request, and the final
    text per request (from the detokenizer, as `LLM.generate` gathers it)."""
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=plugins, **settings) as llm:
        e = llm.engine
        requests = [Request(list(q), p) for q, p in zip(prompts, params)]
        for i, r in enumerate(requests):
            r.eos_token_ids = eos.get(i, [])
            e.add_request(r)
        deltas = {r.request_id: [] for r in requests}
        texts = {r.request_id: "" for r in requests}
        while e.has_work() or e.detokenizer.busy():
            if e.has_work():
                outputs = e.step()
                ids = [o.request_id for o in outputs]
                assert len(ids) == len(set(ids)), "two deltas of one request in a step"
                for o in outputs:
                    deltas[o.request_id].append(o)
            for o in e.detokenizer.take(wait=not e.has_work()):
                texts[o.request_id] += o.text
        return requests, deltas, texts


def _logprobs(r) -> list:
    return [(lp.token_id, round(lp.logprob, 4), [t for t, _ in lp.top]) for lp in r.output_logprobs]


@pytest.mark.parametrize("wrong_every", [0, 3])  # every draft right; every third wrong
def test_verify_steps_end_requests_as_plain_decoding(case, wrong_every):
    model_dir, prompts, reference = case
    with LLM(str(model_dir), dtype="float32", device="cpu") as llm:
        texts = [
            o.text
            for o in llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        ]
    params, eos = _params(reference, texts), _eos(reference)
    plain, _, plain_texts = _run(model_dir, prompts, params, eos)
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every)
    spec, deltas, spec_texts = _run(model_dir, prompts, params, eos, pm, speculator="oracle")
    reasons = {r.finish_reason for r in plain}
    assert FinishReason.STOP in reasons and FinishReason.LENGTH in reasons
    assert any(len(r.output_token_ids) < MAX_NEW for r in plain if r.params.stop)  # a string
    widest = 0
    for p, s in zip(plain, spec):
        assert s.output_token_ids == p.output_token_ids, s.params
        assert (s.finish_reason, s.error) == (p.finish_reason, p.error), s.params
        assert spec_texts[s.request_id] == plain_texts[p.request_id], s.params
        assert _logprobs(s) == _logprobs(p), s.params
        assert len(s.output_logprobs) == (
            len(s.output_token_ids) if s.params.logprobs is not None else 0
        )
        assert s.first_token_time is not None
        ds = deltas[s.request_id]
        n = len(s.output_token_ids)  # (a stop string is found by the detokenizer after the
        streamed = [t for d in ds for t in d.new_token_ids]  # step: its output is cut then)
        assert streamed[:n] == s.output_token_ids and (s.params.stop or len(streamed) == n)
        assert [lp for d in ds for lp in d.new_logprobs][:n] == s.output_logprobs
        assert [d.finished for d in ds] == [False] * (len(ds) - 1) + [True]
        assert ds[-1].finish_reason == s.finish_reason or s.params.stop
        widest = max(widest, *(len(d.new_token_ids) for d in ds))
    assert widest > 1  # drafts were accepted: deltas of several tokens


def _stop_token_by_token(r: Request, tokens, max_model_len: int):
    """The reference: append the tokens one by one, checking after each (the engine's rule
    before verify steps appended their tokens at once)."""
    params, n_out, n_all = r.params, len(r.output_token_ids), len(r.token_ids)
    for i, t in enumerate(tokens):
        if not params.ignore_eos and t in r.eos_token_ids:
            return i, FinishReason.STOP
        if t in params.stop_token_ids:
            return i, FinishReason.STOP
        if n_out + i + 1 >= params.max_tokens or n_all + i + 1 >= max_model_len:
            return i, FinishReason.LENGTH
    return None


def test_first_stop_is_the_token_by_token_stop():
    """`first_stop` against appending token by token, for EOS, stop tokens, `ignore_eos`,
    `max_tokens` and the context length, single tokens and chains."""
    rng = random.Random(0)
    for _ in range(3000):
        params = SamplingParams(
            max_tokens=rng.randint(3, 12),
            stop_token_ids=rng.sample(range(8), rng.randint(0, 2)),
            ignore_eos=rng.random() < 0.3,
        )
        eos = [rng.randrange(8)] if rng.random() < 0.8 else []
        r = Request([1] * rng.randint(1, 6), params, eos_token_ids=eos)
        for _ in range(rng.randint(0, params.max_tokens - 1)):
            r.append_token(9)
        max_len = r.num_tokens + rng.randint(1, 8)
        tokens = [rng.randrange(10) for _ in range(rng.randint(1, 6))]
        expected = _stop_token_by_token(r, tokens, max_len)
        assert first_stop(r, tokens, max_len) == expected, (params, eos, tokens, max_len)
        assert first_stop(r, tuple(tokens[:1]), max_len) == _stop_token_by_token(
            r, tokens[:1], max_len
        )
