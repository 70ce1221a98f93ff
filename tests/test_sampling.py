"""The standard sampler: distributions, filters' support, penalties, seeds and logprobs."""

from __future__ import annotations

import math

import pytest
import torch
from fixtures.devices import DEVICES
from pegboard.plugins.sampling.penalties import apply_penalties
from pegboard.plugins.sampling.standard import StandardSampler
from pegboard.sdk.types import Request, SamplingParams

#: probabilities 0.4, 0.3, 0.2, 0.1 (distinct, so every filter's support is unambiguous)
PROBS = torch.tensor([0.4, 0.3, 0.2, 0.1])


@pytest.fixture(params=DEVICES)
def device(request) -> torch.device:
    return torch.device(request.param)


def requests_for(n: int, **params) -> list[Request]:
    """`n` requests with the same params and seeds 0..n-1 (so their draws are independent)."""
    return [Request([1, 2, 3], SamplingParams(seed=i, **params)) for i in range(n)]


def draw_many(logits: torch.Tensor, n: int, device: torch.device, **params) -> torch.Tensor:
    """Sample one token from the same `[vocab]` logits in `n` independent rows."""
    out = StandardSampler().sample(logits.to(device).repeat(n, 1), requests_for(n, **params))
    return torch.tensor(out.token_ids)


def frequencies(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    return torch.bincount(tokens, minlength=vocab).double() / len(tokens)


def assert_matches_distribution(tokens: torch.Tensor, expected: torch.Tensor) -> None:
    """Each token's frequency is within 5 standard errors of its expected probability."""
    n = len(tokens)
    got = frequencies(tokens, len(expected))
    expected = expected.double()
    bound = 5 * (expected * (1 - expected) / n).sqrt() + 1e-9
    assert ((got - expected).abs() <= bound).all(), (got, expected)


# --- greedy -------------------------------------------------------------------------------------


def test_greedy_is_argmax(device):
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0)).to(device)
    out = StandardSampler().sample(logits.clone(), requests_for(8, temperature=0.0))
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 8


def test_greedy_breaks_ties_on_the_lowest_index(device):
    logits = torch.tensor([[0.0, 3.0, 1.0, 3.0], [5.0, 5.0, 5.0, 5.0]], device=device)
    requests = [Request([1], SamplingParams(temperature=0.0, top_k=2)) for _ in range(2)]
    requests[1].params.presence_penalty = 0.5  # takes the vectorised path, not the fast one
    assert StandardSampler().sample(logits, requests).token_ids == [1, 0]


def test_greedy_rows_in_a_mixed_batch_take_the_argmax_and_no_random_stream(device):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(1)).to(device)
    requests = requests_for(6, temperature=1.0)
    for r in requests[::2]:
        r.params.temperature = 0.0
    out = StandardSampler().sample(logits.clone(), requests)
    assert out.token_ids[::2] == logits[::2].argmax(dim=-1).tolist()
    assert all("sampler" not in r.plugin_state for r in requests[::2])
    # On CUDA, unfiltered rows are drawn by the counter-based Gumbel kernel: no generator.
    uses_generator = device.type == "cpu"
    assert all(("sampler" in r.plugin_state) == uses_generator for r in requests[1::2])


# --- temperature and filters ----------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_samples_softmax_of_scaled_logits(device, temperature):
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    tokens = draw_many(logits, 8000, device, temperature=temperature)
    assert_matches_distribution(tokens, (logits / temperature).softmax(dim=-1))


def test_top_k_never_emits_tokens_outside_the_k_most_likely(device):
    tokens = draw_many(PROBS.log(), 4000, device, top_k=2)
    assert set(tokens.tolist()) == {0, 1}
    assert_matches_distribution(tokens, torch.tensor([4 / 7, 3 / 7, 0, 0]))


def test_top_k_at_least_the_vocabulary_keeps_every_token(device):
    tokens = draw_many(PROBS.log(), 2000, device, top_k=10)
    assert set(tokens.tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize(("top_p", "support"), [(0.35, {0}), (0.6, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_smallest_set_reaching_p(device, top_p, support):
    tokens = draw_many(PROBS.log(), 4000, device, top_p=top_p)
    assert set(tokens.tolist()) == support
    kept = torch.tensor([PROBS[i] if i in support else 0.0 for i in range(4)])
    assert_matches_distribution(tokens, kept / kept.sum())


@pytest.mark.parametrize(("min_p", "support"), [(0.3, {0, 1, 2}), (0.6, {0, 1}), (1.0, {0})])
def test_min_p_drops_tokens_below_min_p_times_the_top_probability(device, min_p, support):
    tokens = draw_many(PROBS.log(), 4000, device, min_p=min_p)
    assert set(tokens.tolist()) == support


def test_min_p_applies_to_temperature_scaled_probabilities(device):
    # At T=0.5 the probabilities become 16:9:4:1 / 30, so min_p=0.3 drops token 2 (4/16 < 0.3),
    # which it keeps at T=1 (0.2/0.4 >= 0.3).
    tokens = draw_many(PROBS.log(), 4000, device, temperature=0.5, min_p=0.3)
    assert set(tokens.tolist()) == {0, 1}
    assert_matches_distribution(tokens, torch.tensor([16 / 25, 9 / 25, 0, 0]))


def test_top_k_then_top_p_keeps_the_nucleus_of_the_k_most_likely(device):
    # Within the top 3 (0.4, 0.3, 0.2 renormalised to 4/9, 3/9, 2/9) the 0.6 nucleus is {0, 1}.
    tokens = draw_many(PROBS.log(), 4000, device, top_k=3, top_p=0.6)
    assert set(tokens.tolist()) == {0, 1}
    assert_matches_distribution(tokens, torch.tensor([4 / 7, 3 / 7, 0, 0]))


def test_filters_combine_per_row(device):
    n = 3000
    logits = PROBS.log().to(device).repeat(3 * n, 1)
    row_params = [{"top_k": 1}, {"top_p": 0.6}, {"min_p": 0.6}]
    requests = [Request([1], SamplingParams(seed=i, **row_params[i // n])) for i in range(3 * n)]
    tokens = StandardSampler().sample(logits, requests).token_ids
    assert set(tokens[:n]) == {0}
    assert set(tokens[n : 2 * n]) == {0, 1}
    assert set(tokens[2 * n :]) == {0, 1}


def test_filtered_tokens_are_never_drawn_however_extreme_the_logits(device):
    logits = torch.tensor([30.0, -30.0, -30.0, -60.0])
    tokens = draw_many(logits, 2000, device, temperature=5.0, top_k=1)
    assert set(tokens.tolist()) == {0}


# --- seeds --------------------------------------------------------------------------------------


def run(requests: list[Request], logits_of, steps: int, device, sampler=None) -> dict[str, list]:
    """Sample `steps` tokens for `requests` (batched), appending them; tokens per request id."""
    sampler = sampler or StandardSampler()
    for _ in range(steps):
        logits = torch.stack([logits_of(r) for r in requests]).to(device)
        for r, t in zip(requests, sampler.sample(logits, requests).token_ids):
            r.append_token(t)
    return {r.request_id: list(r.output_token_ids) for r in requests}


def flat_logits(r: Request) -> torch.Tensor:
    return torch.zeros(64)


def seeded(seed: int, request_id: str, **params) -> Request:
    return Request([1, 2], SamplingParams(seed=seed, **params), request_id=request_id)


def test_same_seed_gives_the_same_tokens(device):
    a = run([seeded(7, "a")], flat_logits, 20, device)["a"]
    b = run([seeded(7, "b")], flat_logits, 20, device)["b"]
    c = run([seeded(8, "c")], flat_logits, 20, device)["c"]
    assert a == b
    assert a != c


def test_seeded_tokens_do_not_depend_on_batch_composition_or_position(device):
    alone = run([seeded(42, "x", top_p=0.9)], flat_logits, 15, device)["x"]
    batch = [seeded(i, f"o{i}", temperature=0.7) for i in range(4)]
    batch.insert(2, seeded(42, "x", top_p=0.9))
    batch.append(Request([5], SamplingParams(temperature=0.0)))
    crowded = run(batch, flat_logits, 15, device)["x"]
    reordered = run(
        list(reversed([seeded(i, f"o{i}") for i in range(3)] + [seeded(42, "x", top_p=0.9)])),
        flat_logits,
        15,
        device,
    )["x"]
    assert alone == crowded == reordered


def test_unseeded_requests_reproduce_from_the_engine_seed_and_arrival_order(device):
    def tokens(engine_seed: int) -> list[list[int]]:
        requests = [Request([1], SamplingParams(), request_id=f"r{i}", seq=i) for i in range(3)]
        sampler = StandardSampler(StandardSampler.Options(seed=engine_seed))
        out = run(requests, flat_logits, 12, device, sampler)
        return [out[f"r{i}"] for i in range(3)]

    first, again, other = tokens(0), tokens(0), tokens(1)
    assert first == again
    assert first != other
    assert first[0] != first[1]


def test_a_swapped_in_sampler_continues_the_request_stream(device):
    whole = run([seeded(3, "w")], flat_logits, 10, device)["w"]
    request = seeded(3, "s")
    run([request], flat_logits, 4, device, StandardSampler())
    resumed = run([request], flat_logits, 6, device, StandardSampler())["s"]
    assert resumed == whole


# --- penalties ----------------------------------------------------------------------------------


def test_penalties_change_logits_exactly_as_specified():
    logits = torch.tensor([[2.0, -1.0, 0.5, -3.0, 1.0, 0.0]])
    r = Request(
        [0, 3, 3],
        SamplingParams(presence_penalty=0.5, frequency_penalty=0.25, repetition_penalty=2.0),
    )
    for t in [1, 1, 1, 4]:
        r.append_token(t)
    # by hand: token 0 (prompt) 2/2; 1 (out x3) -1*2 -0.75 -0.5; 2 unseen; 3 (prompt) -3*2;
    # 4 (out x1) 1/2 -0.25 -0.5; 5 unseen.
    expected = torch.tensor([[1.0, -3.25, 0.5, -6.0, -0.25, 0.0]])
    torch.testing.assert_close(apply_penalties(logits, [r]), expected)


def test_penalties_apply_per_row_and_leave_unpenalised_rows_alone():
    logits = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    plain = Request([0], SamplingParams())
    presence = Request([0], SamplingParams(presence_penalty=1.0))
    repetition = Request([0], SamplingParams(repetition_penalty=4.0))
    for r in (plain, presence, repetition):
        r.append_token(2)
        r.append_token(2)
    out = apply_penalties(logits, [plain, presence, repetition])
    expected = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.25, 1.0, 0.25]])
    torch.testing.assert_close(out, expected)


def test_presence_and_frequency_count_generated_tokens_only():
    logits = torch.zeros(1, 4)
    r = Request([1, 1, 1], SamplingParams(presence_penalty=1.0, frequency_penalty=1.0))
    r.append_token(2)
    torch.testing.assert_close(apply_penalties(logits, [r]), torch.tensor([[0.0, 0.0, -2.0, 0.0]]))


def test_penalties_follow_tokens_appended_between_steps():
    logits = torch.zeros(1, 4)
    r = Request([3], SamplingParams(frequency_penalty=1.0, repetition_penalty=2.0))
    r.append_token(1)
    torch.testing.assert_close(apply_penalties(logits, [r]), torch.tensor([[0.0, -1.0, 0.0, 0.0]]))
    r.append_token(1)
    r.append_token(2)
    torch.testing.assert_close(apply_penalties(logits, [r]), torch.tensor([[0.0, -2.0, -1.0, 0.0]]))


def test_greedy_choice_follows_penalised_logits(device):
    logits = torch.tensor([[3.0, 2.5, 0.0]], device=device)
    r = Request([7], SamplingParams(temperature=0.0, frequency_penalty=1.0))
    r.append_token(0)
    assert StandardSampler().sample(logits, [r]).token_ids == [1]


# --- logprobs -----------------------------------------------------------------------------------


def test_logprobs_come_from_the_raw_logits(device):
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(5)).to(device)
    raw = logits.log_softmax(dim=-1).cpu()
    requests = [
        Request([1, 2], SamplingParams(seed=1, temperature=0.3, logprobs=5, top_k=3)),
        Request([1], SamplingParams(temperature=0.0, repetition_penalty=3.0, logprobs=0)),
        Request([1], SamplingParams(seed=2)),
    ]
    requests[1].append_token(int(logits[1].argmax()))
    out = StandardSampler().sample(logits.clone(), requests)

    first, second, third = out.logprobs
    assert third is None
    assert first.token_id == out.token_ids[0]
    assert first.logprob == pytest.approx(raw[0, out.token_ids[0]].item(), abs=1e-5)
    top_values, top_ids = raw[0].topk(5)
    assert [t for t, _ in first.top] == top_ids.tolist()
    assert [v for _, v in first.top] == pytest.approx(top_values.tolist(), abs=1e-5)
    assert [v for _, v in first.top] == sorted((v for _, v in first.top), reverse=True)
    # The penalty moved the choice away from the raw argmax; the logprob is still the raw one.
    assert second.token_id == out.token_ids[1] != int(logits[1].argmax())
    assert second.logprob == pytest.approx(raw[1, out.token_ids[1]].item(), abs=1e-5)
    assert second.top == []


def test_greedy_logprobs_fast_path_reports_the_top_token(device):
    logits = torch.tensor([[0.0, 1.0, 2.0]], device=device)
    out = StandardSampler().sample(
        logits, [Request([1], SamplingParams(temperature=0, logprobs=2))]
    )
    lp = out.logprobs[0]
    raw = torch.tensor([0.0, 1.0, 2.0]).log_softmax(dim=-1)
    assert lp.token_id == 2
    assert lp.logprob == pytest.approx(raw[2].item())
    assert [t for t, _ in lp.top] == [2, 1]
    assert math.isclose(lp.top[1][1], raw[1].item(), abs_tol=1e-6)


def test_to_device_gives_the_values_with_the_requested_dtype():
    from pegboard.sdk import to_device

    cpu = torch.device("cpu")
    assert to_device([], cpu, torch.int64).dtype == torch.int64  # empty index lists stay ints
    assert to_device([1, 2], cpu, torch.int64).tolist() == [1, 2]
    assert to_device([[0.5, 2.0]], cpu, torch.float64).dtype == torch.float64


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_to_device_does_not_wait_for_the_gpu():
    """A pageable host-to-device copy waits for the stream; `to_device` must not."""
    import time

    from pegboard.sdk import to_device

    x = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    for _ in range(20):
        x = x @ x / 100  # ~0.2 s of queued GPU work
    start = time.perf_counter()
    t = to_device(list(range(1000)), torch.device("cuda"), torch.int64)
    queued = time.perf_counter() - start
    torch.cuda.synchronize()
    total = time.perf_counter() - start
    assert t.tolist() == list(range(1000))
    assert queued < total / 4, (queued, total)


def test_batch_facts_are_reused_only_for_the_same_requests():
    """The sampler keeps one batch's parameters while the same requests recur (decode steps);
    a batch with any other request, even one with equal parameters, gets its own."""
    sampler = StandardSampler()
    a, b = requests_for(2, temperature=0.7, top_k=5)
    c = Request([1], SamplingParams(temperature=0.0, logprobs=1), request_id="c")
    first = sampler._batch_facts([a, b], 32)
    assert sampler._batch_facts([a, b], 32) is first
    assert sampler._batch_facts([b, a], 32) is not first
    facts = sampler._batch_facts([a, c], 32)
    assert facts.want_logprobs == [1] and not facts.greedy and facts.plain == [1]
    assert sampler._batch_facts([c], 32).greedy


def test_a_recurring_batch_samples_as_fresh_samplers_do(device):
    """Consecutive steps of one batch through one sampler (cached facts) draw the tokens that
    a new sampler per step draws (facts computed afresh), filtered and plain rows alike."""
    torch.manual_seed(0)
    steps = [torch.randn(4, 50, device=device) for _ in range(6)]

    def batch():
        rs = [
            Request([1], SamplingParams(temperature=0.8, seed=7), request_id="s"),
            Request([1], SamplingParams(temperature=1.2, top_p=0.9, seed=11), request_id="u"),
            Request([1], SamplingParams(temperature=0.0), request_id="g"),
            Request([1], SamplingParams(temperature=0.5, min_p=0.1, seed=3), request_id="m"),
        ]
        return rs

    def run(fresh: bool) -> list[list[int]]:
        rs, sampler, out = batch(), StandardSampler(), []
        for logits in steps:
            if fresh:
                sampler = StandardSampler()
            ids = sampler.sample(logits.clone(), rs).token_ids
            ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
            for r, t in zip(rs, ids):
                r.append_token(t)
            out.append(ids)
        return out

    assert run(fresh=False) == run(fresh=True)
