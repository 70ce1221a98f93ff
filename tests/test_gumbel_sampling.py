"""The one-pass Gumbel-max sampling kernel (plugins/sampling/gumbel.py), both noise sources:
the softmax distribution (a chi-square test), argmax for greedy rows and for `argmax`, per-row
seeds independent of the batch and of the tiling, the Philox stream's tokens unchanged.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
Triton is imported); on a GPU the same checks run on CUDA, and the standard sampler's own
distribution tests (tests/test_sampling.py, device "cuda") go through this kernel.
"""

from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from pegboard.plugins.sampling import gumbel  # noqa: E402
from pegboard.plugins.sampling.gumbel import NOISES, gumbel_sample  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Small tiles keep the CPU interpreter fast and still give several blocks and chunks per row;
# the GPU runs the production sizes.
TILES = {"chunk": 32, "block": 16} if DEVICE.type == "cpu" else {}
CHUNK = TILES.get("chunk", 16384)
# The Philox path is ~2.5x slower than the hash path in the CPU interpreter; its tokens are
# pinned by `test_the_philox_stream_gives_the_tokens_it_gave_before` (two tilings in one),
# so its statistical and tiling runs are `slow` there (they run on the GPU and in the full suite).
SLOW_PHILOX = ["hash", pytest.param("philox", marks=pytest.mark.slow)]


def sample(logits, temperature, seeds, noise="hash", **tiles):
    t = torch.as_tensor(temperature, dtype=torch.float32, device=DEVICE)
    s = torch.as_tensor(seeds, dtype=torch.int64, device=DEVICE)
    return gumbel_sample(logits.to(DEVICE), t, s, noise=noise, **(tiles or TILES)).cpu()


@pytest.mark.parametrize("noise", SLOW_PHILOX)
def test_draws_follow_the_tempered_softmax(noise):
    probs = torch.tensor([0.9, 0.1])
    temperature = 0.5
    n = 500 if DEVICE.type == "cpu" else 20000
    logits = (probs.log() * temperature).repeat(n, 1)  # softmax(logits / T) == probs
    tokens = sample(logits, [temperature] * n, list(range(n)), noise)
    freq = torch.bincount(tokens, minlength=2).double() / n
    # Ignoring the temperature would give 0.75 / 0.25, no noise 1.0 / 0.0: both far outside.
    bound = 5 * (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= bound).all(), freq


@pytest.mark.parametrize("noise", SLOW_PHILOX)
def test_draws_pass_a_chi_square_test(noise):
    # Six tokens, one row per seed (seeds 0..n-1: neighbours, a weak hash's hardest case).
    # With 5 degrees of freedom a statistic above 25.7 has probability 1e-4 for a correct
    # sampler; the seeds are fixed, so the test is deterministic. A hash that ignores the key
    # or the token, or one logarithm too few, gives far more.
    logits = torch.tensor([0.9, 0.6, 0.3, 0.0, -0.3, -0.8])
    temperature = 0.8
    n = 600 if DEVICE.type == "cpu" else 60000
    tokens = sample(logits.repeat(n, 1), [temperature] * n, list(range(n)), noise)
    observed = torch.bincount(tokens, minlength=6).double()
    expected = (logits.double() / temperature).softmax(-1) * n
    chi_square = float(((observed - expected) ** 2 / expected).sum())
    assert chi_square < 25.7, (chi_square, observed.tolist(), expected.tolist())


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # the interpreter's log2(0)
def test_extreme_hash_values_do_not_pick_unlikely_tokens():
    # Seeds found by search (a numpy replica of `_keys` and `_hash_uniform`): with 9592683
    # token 1's uniform rounds to exactly 1, with 2746555 it is 30 * 2^-32. Noise computed as
    # -log2(-log2(u)) was infinite for the first (a 1e-30 clamp: +99.7) and picked token 1 at
    # odds of e^-20; now that token is skipped, and the second's noise (~18 nats) stays finite.
    logits = torch.tensor([[20.0, 0.0], [20.0, 0.0]])
    assert sample(logits, [1.0, 1.0], [9592683, 2746555]).tolist() == [0, 0]


def test_greedy_rows_take_the_first_argmax_across_chunks():
    vocab = CHUNK * 2 + 100  # three chunks, the maximum tied in the second and third
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, CHUNK + 5] = 10.0
    logits[:, 2 * CHUNK + 7] = 10.0
    logits[2, 3] = 11.0
    for noise in NOISES:
        tokens = sample(logits, [0.0, 0.0, 0.0], [1, 2, 3], noise)
        assert tokens.tolist() == [CHUNK + 5, CHUNK + 5, 3]
    assert tokens.tolist() == logits.argmax(-1).tolist()
    assert gumbel.argmax(logits.to(DEVICE), **TILES).cpu().tolist() == [CHUNK + 5, CHUNK + 5, 3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_torch_argmax(dtype):
    # Ties (bf16 rounds many values together), a row of -inf, a partial last block and chunk.
    logits = torch.randn(5, 203, generator=torch.Generator().manual_seed(4)).to(dtype)
    logits[1] = logits[1].round()  # many ties: the first maximum must win
    logits[2] = float("-inf")
    logits[3, 200] = 99.0  # in the partial last block
    got = gumbel.argmax(logits.to(DEVICE), **TILES).cpu()
    assert got.dtype == torch.int64
    assert got.tolist() == logits.argmax(-1).tolist()
    assert got[3] == 200 and got[2] == 0


@pytest.mark.parametrize("noise", NOISES)
def test_a_row_depends_only_on_its_seed(noise):
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(2))
    seeds = [11, 12, 13, 14, 15, 16]
    full = sample(logits, [1.0] * 6, seeds, noise)
    alone = sample(logits[2:3], [1.0], seeds[2:3], noise)
    assert full[2] == alone[0]
    again = sample(logits, [1.0] * 6, seeds, noise)
    assert torch.equal(full, again)
    other = sample(logits, [1.0] * 6, [s + 100 for s in seeds], noise)
    assert not torch.equal(full, other)  # six 100-way draws: equal by chance ~never


@pytest.mark.parametrize("noise", SLOW_PHILOX)
def test_a_tokens_noise_does_not_depend_on_the_tiling(noise):
    # Four neighbouring tokens share one Philox call; which call a token's noise comes from
    # must not move with the chunk and block sizes (they are tuning knobs, not semantics).
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(3))
    seeds = list(range(40, 48))
    small = sample(logits, [1.0] * 8, seeds, noise, chunk=32, block=16)
    large = sample(logits, [1.0] * 8, seeds, noise, chunk=128, block=64)
    uneven = sample(logits, [1.0] * 8, seeds, noise, chunk=48, block=16)
    assert torch.equal(small, large) and torch.equal(small, uneven)


def test_the_philox_stream_gives_the_tokens_it_gave_before():
    # Recorded from the kernel as it was before the hash noise (commit 6ad9f2e, chunk 64,
    # block 16): `noise="philox"` keeps a seed's tokens, temperatures and greedy rows included.
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(3))
    temperature = [1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.0, 2.0]
    seeds = list(range(40, 48))
    assert sample(logits, temperature, seeds, "philox").tolist() == [
        *(275, 31, 35, 156, 64, 234, 118, 19)
    ]
    half = logits.to(torch.bfloat16)
    assert sample(half, temperature, [s + 1000 for s in seeds], "philox").tolist() == [
        *(183, 61, 4, 126, 149, 163, 118, 4)
    ]


def test_chunks_give_every_batch_size_enough_programs():
    for rows in (1, 2, 64, 256, 1024):
        chunk = gumbel.chunk_size(rows, 151936)
        programs = rows * -(-151936 // chunk)
        assert chunk % gumbel.BLOCK == 0
        assert programs >= min(gumbel.TARGET_PROGRAMS // 2, rows * 151936 // gumbel.BLOCK)
    assert gumbel.chunk_size(1, 151936) == gumbel.BLOCK  # one row: one block per program


def test_an_unknown_noise_is_refused():
    with pytest.raises(ValueError, match="noise"):
        sample(torch.zeros(1, 4), [1.0], [0], "xorshift")


@pytest.mark.parametrize("noise", NOISES)
def test_masked_tokens_are_never_drawn(noise):
    logits = torch.zeros(80, 8)
    logits[:, ::2] = float("-inf")
    tokens = sample(logits, [1.5] * 80, list(range(80)), noise)
    assert (tokens % 2 == 1).all()
    assert set(tokens.tolist()) == {1, 3, 5, 7}


@pytest.mark.parametrize("noise", NOISES)
def test_the_standard_sampler_draws_with_the_noise_its_option_names(noise, monkeypatch):
    # The sampler's CUDA path, run here on the interpreter: plain rows by this kernel with the
    # option's noise and the sampler's per-draw seeds; an all-greedy batch by `argmax`.
    from pegboard.plugins.sampling import standard
    from pegboard.sdk.types import Request, SamplingParams

    monkeypatch.setattr(standard, "_gumbel_available", lambda device: True)
    options = standard.StandardSampler.Options(gumbel_noise=noise, triton_argmax=True)
    sampler = standard.StandardSampler(options)
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    requests = [Request([1, 2], SamplingParams(temperature=0.7, seed=i)) for i in range(6)]
    tokens = torch.as_tensor(sampler.sample(logits, requests).token_ids).cpu()
    seeds = torch.from_numpy(sampler._draw_seeds(requests)).to(DEVICE)
    t = torch.full((6,), 0.7, device=DEVICE)
    assert torch.equal(tokens, gumbel_sample(logits, t, seeds, noise=noise).cpu())
    other = "philox" if noise == "hash" else "hash"
    assert not torch.equal(tokens, gumbel_sample(logits, t, seeds, noise=other).cpu())
    calls = []
    monkeypatch.setattr(gumbel, "argmax", lambda x: calls.append(x) or x.argmax(-1))
    greedy = [Request([1], SamplingParams(temperature=0.0)) for _ in range(6)]
    drawn = torch.as_tensor(sampler.sample(logits, greedy).token_ids).cpu()
    assert drawn.tolist() == logits.argmax(-1).cpu().tolist()
    assert len(calls) == 1


def _states_and_seeds(base, drawn, advance):
    """The kernel's inputs (int64 splitmix64 states of rows that had drawn `drawn` tokens) and
    the seeds `StandardSampler._draw_seeds` gives once each drew `advance` more (requests
    stood in for by their token counts: a `range` has a length, not the tokens)."""
    from pegboard.plugins.sampling import standard

    states = standard._splitmix_states(base, drawn.astype(np.uint64))
    rows = [SimpleNamespace(output_token_ids=range(n + advance)) for n in drawn.tolist()]
    seeds = standard.StandardSampler()._draw_seeds(rows, base)
    return torch.from_numpy(states.view(np.int64)), seeds


@pytest.mark.parametrize("noise", NOISES)
def test_seeds_derived_in_the_kernel_are_the_hosts_bit_for_bit(noise):
    # `states` + `advance` (the standard sampler's steady path) against explicit seeds from
    # `_draw_seeds` (its path before): bases at 0, 2^63 and 2^64 - 1, random 64-bit ones,
    # token counts up to 2^40, advances to 2^31 - 1, so states wrap past 2^64 and about half
    # the finalized seeds have the top bit to mask. Uniform logits: a row whose seed is wrong
    # changes its token with probability 15/16.
    rng = np.random.default_rng(7)
    rows = 32
    base = rng.integers(0, 2**64, rows, dtype=np.uint64, endpoint=False)
    base[:5] = [0, 1, 2**63 - 1, 2**63, 2**64 - 1]
    drawn = rng.integers(0, 2**40, rows)
    drawn[: rows // 2] %= 50
    logits = torch.zeros(rows, 16)
    t = torch.ones(rows, device=DEVICE)
    for advance in (0, 1, 37, 2**31 - 1):
        states, seeds = _states_and_seeds(base, drawn, advance)
        expected = sample(logits, [1.0] * rows, seeds, noise)
        got = gumbel_sample(
            logits.to(DEVICE), t, None, noise=noise, states=states.to(DEVICE), advance=advance,
            **TILES,
        )  # fmt: skip
        assert torch.equal(got.cpu(), expected), (advance, (got.cpu() != expected).sum())


def test_states_and_their_advance_are_checked():
    logits, t, s = (
        torch.zeros(1, 4, device=DEVICE),
        torch.ones(1, device=DEVICE),
        torch.zeros(1, dtype=torch.int64, device=DEVICE),
    )
    for kwargs in ({}, {"states": s}):  # neither, or both
        with pytest.raises(ValueError, match="either seeds or states"):
            gumbel_sample(logits, t, s if kwargs else None, **kwargs)
    for advance in (-1, 2**31):  # the kernel's argument is an int32
        with pytest.raises(ValueError, match="advance"):
            gumbel_sample(logits, t, None, states=s, advance=advance)


def _todays_tokens(sampler, logits, requests, noise):
    """The sampler's tokens as drawn before the seeds moved to the kernel: explicit per-step
    seeds from `_draw_seeds` for the rows without filters; the rows with top-k 1 (the
    filtered path's, deterministic here) their argmax."""
    from pegboard.plugins.sampling.gumbel import gumbel_sample as explicit

    tokens = logits.argmax(-1).cpu()
    plain = [i for i, r in enumerate(requests) if r.params.top_k != 1]
    rows = [requests[i] for i in plain]
    seeds = torch.from_numpy(sampler._draw_seeds(rows)).to(DEVICE)
    t = torch.tensor([r.params.temperature for r in rows], device=DEVICE)
    tokens[plain] = explicit(logits[plain], t, seeds, noise=noise).cpu()
    return tokens


def _step(sampler, requests, uploads, gen, noise):
    """One sampling step as the engine makes it, checked against `_todays_tokens`; each row
    then appends its token. The number of `to_device` copies the step made."""
    logits = torch.randn(len(requests), 40, generator=gen).to(DEVICE)
    before = len(uploads)
    tokens = torch.as_tensor(sampler.sample(logits, requests).token_ids).cpu()
    copies = len(uploads) - before
    assert torch.equal(tokens, _todays_tokens(sampler, logits, requests, noise))
    for request, token in zip(requests, tokens.tolist()):
        request.output_token_ids.append(token)
    return copies


def _counting_uploads(monkeypatch) -> list:
    """The standard sampler on its CUDA path (here under the interpreter), its `to_device`
    calls recorded."""
    from pegboard.plugins.sampling import standard

    monkeypatch.setattr(standard, "_gumbel_available", lambda device: True)
    uploads, to_device = [], standard.to_device
    monkeypatch.setattr(
        standard, "to_device", lambda *a, **k: uploads.append(a) or to_device(*a, **k)
    )
    return uploads


@pytest.mark.parametrize("noise", NOISES)
def test_a_recurring_batch_draws_todays_tokens_with_no_upload(noise, monkeypatch):
    # Issue 17: a decode batch that recurs (the same requests, one token each per step) reuses
    # its seed states on the device; the tokens stay those of per-step host seeds, seeded rows
    # and unseeded ones, through rows drawing unevenly (states rebuilt) and a changed batch.
    from pegboard.plugins.sampling import standard
    from pegboard.sdk.types import Request, SamplingParams

    uploads = _counting_uploads(monkeypatch)
    options = standard.StandardSampler.Options(gumbel_noise=noise, seed=3)
    sampler, gen = standard.StandardSampler(options), torch.Generator().manual_seed(8)
    seeds = (5, None, 2**64 - 1, None, 0, 2**63)
    requests = [Request([1, 2], SamplingParams(temperature=0.7, seed=s)) for s in seeds]
    requests[3].output_token_ids.extend([9] * 5)  # rows start from different counts
    step = functools.partial(_step, sampler, uploads=uploads, gen=gen, noise=noise)
    assert step(requests) == 2  # a new batch: its temperatures and its seed states
    assert [step(requests) for _ in range(3)] == [0, 0, 0]  # the feature: no copy at all
    requests[0].output_token_ids.append(1)  # row 0 now one token ahead of the others
    assert step(requests) == 1  # the states rebuilt from the current counts
    assert [step(requests) for _ in range(2)] == [0, 0]
    joined = Request([3], SamplingParams(temperature=1.3, seed=7))
    changed = requests[1:] + [joined]  # one request left, one joined
    assert step(changed) == 2
    assert step(changed) == 0
    assert step(requests) == 2  # the first batch again: new facts, new states


def test_a_recurring_mixed_batch_keeps_its_split_and_seed_states(monkeypatch):
    # Rows with top-k beside plain ones: the plain rows' facts, seed states and both parts'
    # row indices are made once per batch; the plain rows' tokens stay today's.
    from pegboard.plugins.sampling import standard
    from pegboard.sdk.types import Request, SamplingParams

    uploads = _counting_uploads(monkeypatch)
    sampler, gen = standard.StandardSampler(), torch.Generator().manual_seed(10)
    plain = [SamplingParams(temperature=t, seed=s) for t, s in ((0.7, 1), (0.0, 2), (1.1, None))]
    filtered = SamplingParams(temperature=0.8, top_k=1)
    requests = [Request([1], p) for p in (plain[0], filtered, plain[1], filtered, plain[2])]
    step = functools.partial(_step, sampler, uploads=uploads, gen=gen, noise="philox")
    assert step(requests) == 4  # both row indices, the plain rows' temperatures and states
    assert [step(requests) for _ in range(3)] == [0, 0, 0]
    requests[2].output_token_ids.append(3)  # uneven: the plain rows' states rebuilt
    assert step(requests) == 1
    assert step(requests[:4]) == 4  # a changed batch


def test_plain_rows_that_are_all_greedy_beside_filtered_rows(monkeypatch):
    # The Gumbel kernel takes the unfiltered rows, here only greedy ones (whose facts have no
    # base seeds), the generator path the top-k rows.
    from pegboard.plugins.sampling import standard
    from pegboard.sdk.types import Request, SamplingParams

    monkeypatch.setattr(standard, "_gumbel_available", lambda device: True)
    sampler = standard.StandardSampler()
    logits = torch.randn(4, 40, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    greedy, top_k = SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=1)
    requests = [Request([1], p) for p in (greedy, top_k, greedy, top_k)]
    for _ in range(2):
        tokens = torch.as_tensor(sampler.sample(logits, requests).token_ids).cpu()
        assert tokens.tolist() == logits.argmax(-1).cpu().tolist()  # top-k 1: the argmax too
        for request, token in zip(requests, tokens.tolist()):
            request.output_token_ids.append(token)


def test_the_sampler_keeps_todays_tokens_by_default(monkeypatch):
    # Until the GPU measures them, the faster paths are opt-in: Philox noise (a seed's tokens as
    # before) and torch.argmax for greedy batches.
    from pegboard.plugins.sampling import standard
    from pegboard.sdk.types import Request, SamplingParams

    options = standard.StandardSampler.Options()
    assert (options.gumbel_noise, options.triton_argmax) == ("philox", False)
    monkeypatch.setattr(standard, "_gumbel_available", lambda device: True)
    monkeypatch.setattr(gumbel, "argmax", lambda x: pytest.fail("the Triton argmax ran"))
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3))
    greedy = [Request([1], SamplingParams(temperature=0.0)) for _ in range(3)]
    tokens = standard.StandardSampler(options).sample(logits, greedy).token_ids
    assert list(tokens) == logits.argmax(-1).tolist()


def test_the_sampler_refuses_an_unknown_noise():
    from pegboard.plugins.sampling.standard import StandardSampler

    with pytest.raises(ValueError, match="gumbel_noise"):
        StandardSampler.Options(gumbel_noise="xorshift")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("noise", NOISES)
def test_a_confident_row_keeps_its_odds_over_a_full_vocabulary(noise):
    # The noise's far tail on the hardware's logarithms: one token 18 nats above 151,935 others
    # is drawn with probability e^18 / (e^18 + 151,935) = 0.9977 (9.5 of 4,096 rows not). A noise
    # that goes infinite in ~1 % of rows (u = 1, or lg2.approx's error near 1) adds ~40 more.
    rows, vocab = 4096, 151936
    logits = torch.zeros(rows, vocab, dtype=torch.bfloat16, device=DEVICE)
    logits[:, 7] = 18.0
    tokens = sample(logits, [1.0] * rows, list(range(rows)), noise)
    p_other = vocab / (math.exp(18.0) + vocab)
    expected, sd = rows * p_other, math.sqrt(rows * p_other * (1 - p_other))
    others = int((tokens != 7).sum())
    assert abs(others - expected) <= 5 * sd, (others, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_kernels_replay_in_a_cuda_graph():
    # As a sampler's kernels may be captured: fixed shapes, no host sync, no allocation the
    # graph's pool cannot serve. A replay on new logits gives what an eager call gives.
    gen = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.randn(64, 151936, device="cuda", generator=gen).to(torch.bfloat16)
    t = torch.full((64,), 0.6, device="cuda")
    t[::4] = 0.0
    seeds = torch.arange(64, device="cuda", dtype=torch.int64)
    inv = gumbel.inverse_temperature(t)
    gumbel_sample(logits, None, seeds, inv_temperature=inv)  # compile outside the capture
    gumbel.argmax(logits)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        drawn = gumbel_sample(logits, None, seeds, inv_temperature=inv)
        greedy = gumbel.argmax(logits)
    logits.copy_(torch.randn(64, 151936, device="cuda", generator=gen))
    seeds.add_(1000)
    graph.replay()
    assert torch.equal(drawn, gumbel_sample(logits, None, seeds, inv_temperature=inv))
    assert torch.equal(greedy, logits.argmax(-1))
