"""Speculative sampling preserves the target distribution exactly: chi-square tests over many
seeded draws on a 5-token vocabulary, for drafts sampled from a draft distribution and for
deterministic (point-mass) drafts, and end to end through the engine."""

from __future__ import annotations

import collections

import pytest
import torch
from pegboard.core.speculative.verify import accept_sampled, target_probs
from pegboard.sdk.types import Drafts, Request, SamplingParams

VOCAB = 5
DRAWS = 12000
#: chi-square critical value for 4 degrees of freedom at p = 0.001
CRITICAL_DF4 = 18.47


def chi_square(counts: collections.Counter, probs: torch.Tensor) -> float:
    n = sum(counts.values())
    return sum(
        (counts.get(t, 0) - n * float(p)) ** 2 / (n * float(p))
        for t, p in enumerate(probs)
        if p > 0
    )


def run(target: torch.Tensor, draft_probs: torch.Tensor | None, fixed: list[int] | None):
    """Output tokens 0 and 1 of `DRAWS` verifications of 2-token drafts; the target's rows do
    not depend on the prefix, so token i of plain sampling is distributed as `target[i]`."""
    gen = torch.Generator().manual_seed(0)
    first, second = collections.Counter(), collections.Counter()
    accepted = 0
    for _ in range(DRAWS):
        if draft_probs is not None:
            tokens = [int(torch.multinomial(q, 1, generator=gen)) for q in draft_probs]
        else:
            tokens = list(fixed)
        out = accept_sampled(target, Drafts(tokens, probs=draft_probs), gen).tokens
        first[out[0]] += 1
        if len(out) > 1:
            second[out[1]] += 1
        accepted += len(out) - 1
    return first, second, accepted


@pytest.fixture
def target():
    return torch.tensor(
        [[0.5, 0.2, 0.15, 0.1, 0.05], [0.1, 0.1, 0.2, 0.3, 0.3], [0.2, 0.2, 0.2, 0.2, 0.2]]
    )


def test_rejection_sampling_matches_the_target_distribution(target):
    draft = torch.tensor([[0.1, 0.1, 0.1, 0.2, 0.5], [0.4, 0.3, 0.1, 0.1, 0.1]])
    first, second, accepted = run(target, draft, None)
    assert chi_square(first, target[0]) < CRITICAL_DF4
    assert chi_square(second, target[1]) < CRITICAL_DF4
    assert accepted > 0


def test_point_mass_drafts_match_the_target_distribution(target):
    first, second, accepted = run(target, None, [0, 3])
    assert chi_square(first, target[0]) < CRITICAL_DF4
    assert chi_square(second, target[1]) < CRITICAL_DF4
    assert accepted > DRAWS * 0.4  # token 0 has probability 0.5 under the target


def test_a_draft_equal_to_the_target_is_always_accepted(target):
    gen = torch.Generator().manual_seed(1)
    for _ in range(200):
        out = accept_sampled(target, Drafts([1, 2], probs=target[:2]), gen).tokens
        assert out[:2] == [1, 2] and len(out) == 3


def test_target_probs_apply_temperature_and_filters():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -2.0]])
    r = Request([1], SamplingParams(temperature=0.5, top_k=2))
    p = target_probs(logits, r)[0]
    assert p[2:].sum() == 0
    assert torch.allclose(p[:2], torch.tensor([2.0, 1.0]).div(0.5).softmax(0))


def test_engine_sampling_with_a_draft_model_matches_plain_sampling(tiny_llama_dir, tmp_path):
    """End to end: 400 seeded requests of one prompt at temperature 0.5, with and without a
    draft model; the third output token (verified after two drafts) has the same distribution
    (two-sample chi-square over the 6 most common tokens and the rest)."""
    from fixtures import build_tiny_model
    from pegboard.core.llm import LLM

    draft = build_tiny_model(tmp_path / "draft", "llama", seed=5, num_hidden_layers=1)
    prompt = [11, 12, 13, 14, 15, 16, 17, 18]
    n = 400

    def third_tokens(**settings):
        params = [SamplingParams(max_tokens=3, temperature=0.5, seed=1000 * i) for i in range(n)]
        with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", **settings) as llm:
            return collections.Counter(o.token_ids[2] for o in llm.generate([prompt] * n, params))

    plain = third_tokens()
    spec = third_tokens(speculator="draft", plugin_options={"draft": {"model_path": str(draft)}})
    top = [t for t, _ in (plain + spec).most_common(6)]
    bins = [(plain[t], spec[t]) for t in top]
    bins.append((n - sum(a for a, _ in bins), n - sum(b for _, b in bins)))
    stat = sum((a - b) ** 2 / (a + b) for a, b in bins if a + b)  # equal sample sizes
    assert stat < 22.46  # chi-square, 6 degrees of freedom, p = 0.001
