"""The one-pass Gumbel-max sampling kernel (plugins/sampling/gumbel.py): the softmax
distribution, argmax for greedy rows, per-row seeds independent of the batch.

Without a GPU the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1, set before
Triton is imported); on a GPU the same checks run on CUDA, and the standard sampler's own
distribution tests (tests/test_sampling.py, device "cuda") go through this kernel.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from pegboard.plugins.sampling.gumbel import gumbel_sample  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Small tiles keep the CPU interpreter fast and still give several blocks and chunks per row;
# the GPU runs the production sizes.
TILES = {"chunk": 32, "block": 16} if DEVICE.type == "cpu" else {}
CHUNK = TILES.get("chunk", 16384)


def sample(logits, temperature, seeds, **tiles):
    t = torch.as_tensor(temperature, dtype=torch.float32, device=DEVICE)
    s = torch.as_tensor(seeds, dtype=torch.int64, device=DEVICE)
    return gumbel_sample(logits.to(DEVICE), t, s, **(tiles or TILES)).cpu()


def test_draws_follow_the_tempered_softmax():
    probs = torch.tensor([0.9, 0.1])
    temperature = 0.5
    n = 500 if DEVICE.type == "cpu" else 20000
    logits = (probs.log() * temperature).repeat(n, 1)  # softmax(logits / T) == probs
    tokens = sample(logits, [temperature] * n, list(range(n)))
    freq = torch.bincount(tokens, minlength=2).double() / n
    # Ignoring the temperature would give 0.75 / 0.25, no noise 1.0 / 0.0: both far outside.
    bound = 5 * (probs.double() * (1 - probs.double()) / n).sqrt()
    assert ((freq - probs.double()).abs() <= bound).all(), freq


def test_greedy_rows_take_the_first_argmax_across_chunks():
    vocab = CHUNK * 2 + 100  # three chunks, the maximum tied in the second and third
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1))
    logits[:, CHUNK + 5] = 10.0
    logits[:, 2 * CHUNK + 7] = 10.0
    logits[2, 3] = 11.0
    tokens = sample(logits, [0.0, 0.0, 0.0], [1, 2, 3])
    assert tokens.tolist() == [CHUNK + 5, CHUNK + 5, 3]
    assert tokens.tolist() == logits.argmax(-1).tolist()


def test_a_row_depends_only_on_its_seed():
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(2))
    seeds = [11, 12, 13, 14, 15, 16]
    full = sample(logits, [1.0] * 6, seeds)
    alone = sample(logits[2:3], [1.0], seeds[2:3])
    assert full[2] == alone[0]
    again = sample(logits, [1.0] * 6, seeds)
    assert torch.equal(full, again)
    other = sample(logits, [1.0] * 6, [s + 100 for s in seeds])
    assert not torch.equal(full, other)  # six 100-way draws: equal by chance ~never


def test_a_tokens_noise_does_not_depend_on_the_tiling():
    # Four neighbouring tokens share one Philox call; which call a token's noise comes from
    # must not move with the chunk and block sizes (they are tuning knobs, not semantics).
    logits = torch.randn(8, 300, generator=torch.Generator().manual_seed(3))
    seeds = list(range(40, 48))
    small = sample(logits, [1.0] * 8, seeds, chunk=32, block=16)
    large = sample(logits, [1.0] * 8, seeds, chunk=128, block=64)
    assert torch.equal(small, large)


def test_masked_tokens_are_never_drawn():
    logits = torch.zeros(200, 8)
    logits[:, ::2] = float("-inf")
    tokens = sample(logits, [1.5] * 200, list(range(200)))
    assert (tokens % 2 == 1).all()
    assert set(tokens.tolist()) == {1, 3, 5, 7}
