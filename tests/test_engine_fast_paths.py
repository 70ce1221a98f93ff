"""The step loop's fast paths against what they stand in for: `Engine._append_sampled`, the
resolve loop's one-token append, against the general `_append` (the same tokens, logprobs,
delta, finish and return value for every kind of stop: EOS, ignore_eos, a stop token,
max_tokens, the context length, none), and `_admit`'s decode check (`_all_running`)."""

from __future__ import annotations

import copy
import random

import pytest
from pegboard.core.engine import Engine
from pegboard.core.overlap import PENDING_TOKEN
from pegboard.sdk.types import (
    Request,
    RequestStatus,
    SamplingParams,
    StepBudget,
    TokenLogprobs,
)


def bare_engine(max_model_len: int) -> Engine:
    engine = Engine.__new__(Engine)  # only what `_append*` and `_finish` read
    engine._outbox, engine._num_finished = [], 0
    engine.budget = StepBudget(1 << 20, 256, max_model_len)
    return engine


def random_request(rng: random.Random) -> Request:
    params = SamplingParams(
        max_tokens=rng.randint(1, 6),
        stop_token_ids=rng.sample(range(8), rng.randint(0, 2)),
        ignore_eos=rng.random() < 0.3,
    )
    r = Request(
        [rng.randrange(8) for _ in range(rng.randint(1, 6))],
        params,
        eos_token_ids=frozenset(rng.sample(range(8), rng.randint(0, 2))),
    )
    for _ in range(rng.randint(0, 4)):
        r.extend_tokens([rng.randrange(8)])
    r.first_token_time = rng.choice([None, 1.0])
    return r


def delta(out) -> tuple:
    return (
        out.request_id, out.new_token_ids, out.text, out.new_logprobs,
        out.finished, out.finish_reason, out.error,
    )  # fmt: skip


def state(r: Request) -> tuple:
    return (
        r.token_ids, r.output_token_ids, r.output_logprobs, r.status, r.finish_reason,
        r.first_token_time is None,
    )  # fmt: skip


@pytest.mark.parametrize("seed", range(4))
def test_append_sampled_equals_the_general_append(seed):
    rng = random.Random(seed)
    for _ in range(500):
        max_model_len = rng.randint(2, 14)
        fast, slow = bare_engine(max_model_len), bare_engine(max_model_len)
        a = random_request(rng)
        b = copy.deepcopy(a)
        token = rng.randrange(8)
        lp = rng.choice([None, TokenLogprobs(token, -0.5, [(token, -0.5)])])
        a.token_ids.append(PENDING_TOKEN)  # as `PendingStep` leaves it
        stopped = fast._append_sampled(a, token, lp)
        assert stopped == slow._append(b, (token,), (lp,))
        assert state(a) == state(b)
        assert [delta(o) for o in fast._outbox] == [delta(o) for o in slow._outbox]
        assert all(o.request is a for o in fast._outbox)


def test_all_running_is_the_status_count():
    engine = Engine.__new__(Engine)
    engine.running = [Request([1]) for _ in range(4)]
    for r in engine.running:
        r.status = RequestStatus.RUNNING
    waiting = Request([1])
    a, b, c, d = engine.running
    cases = [[a, b, c, d], [d, c, b, a], [a, b], [a, b, c, waiting], [waiting], [a, waiting, c, d]]
    for scheduled in cases:
        counted = [r.status for r in scheduled].count(RequestStatus.RUNNING) == len(scheduled)
        assert engine._all_running(scheduled) is counted
    assert engine._all_running(list(engine.running))  # the running queue itself, a copy
