"""The tensor-parallel all-reduce fused with the RMSNorm after it (`pegboard.core.kernels.
allreduce_norm`, `pegboard.core.distributed.fused_norm`), on CPU in Triton's interpreter.

Two ranks are simulated from one rank's side: the peer's partial sits in its buffer and its
barrier signal is already in this rank's signal pad, so the kernel runs alone; it must sum
both partials in rank order, add the residual, normalise, consume the peer's signal and leave
its own in the peer's pad. Two processes over shared memory run four fused all-reduces in a
row as real ranks. A decoder whose projections and norms are joined through a one-rank fused
path computes what the unjoined decoder does. The 2-GPU tests are in
test_tensor_parallel.py.
"""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.distributed.fused_norm import ATTENTION, MLP, FusedAllReduceNorm  # noqa: E402
from pegboard.core.kernels.allreduce_norm import allreduce_add_norm  # noqa: E402
from pegboard.core.kernels.norm import rms_norm  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from test_fused_kernels import PROMPTS, prefill_logits  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ROWS, HIDDEN, MAX_ROWS, EPS = 3, 48, 4, 1e-6


def table(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A device array of the tensors' addresses (as torch's `buffer_ptrs_dev`)."""
    return torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64, device=DEVICE)


def randn(*shape: int, seed: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def two_rank_add_norm(buffer_ptrs, pad_ptrs, slot, rank, residual, weight, failed):
    """The fused kernel as `rank` of two, over `[2, MAX_ROWS, HIDDEN]` buffers, in `slot`."""
    offset = slot * MAX_ROWS * HIDDEN
    return allreduce_add_norm(
        buffer_ptrs.data_ptr(), pad_ptrs.data_ptr(), offset, rank, 2, residual, weight, EPS, failed
    )


@pytest.mark.parametrize("rank", [0, 1])
@pytest.mark.parametrize("slot", [ATTENTION, MLP])
def test_one_rank_sums_both_partials_adds_the_residual_and_normalises(rank, slot):
    buffers = [torch.zeros(2, MAX_ROWS, HIDDEN, device=DEVICE) for _ in range(2)]
    for r in range(2):
        buffers[r][slot, :ROWS] = randn(ROWS, HIDDEN, seed=r)
    pads = [torch.zeros(MAX_ROWS * 2, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    peer = 1 - rank
    pads[rank][torch.arange(ROWS) * 2 + peer] = 1  # the peer's programs reached the barrier
    residual, weight = randn(ROWS, HIDDEN, seed=7), 1.0 + 0.3 * randn(HIDDEN, seed=8)
    buffer_ptrs, pad_ptrs = table(buffers), table(pads)
    failed = torch.zeros(1, dtype=torch.int32, device=DEVICE)

    normed, summed = two_rank_add_norm(buffer_ptrs, pad_ptrs, slot, rank, residual, weight, failed)

    partials = buffers[0][slot, :ROWS] + buffers[1][slot, :ROWS]  # rank order
    expected_normed, expected_summed = rms_norm(partials, weight, EPS, residual)
    torch.testing.assert_close(summed, expected_summed, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(normed, expected_normed, atol=1e-5, rtol=1e-5)
    assert failed.item() == 0
    assert not pads[rank].any(), "the peer's signals were not consumed"
    expected_signals = torch.zeros_like(pads[peer])
    expected_signals[torch.arange(ROWS) * 2 + rank] = 1
    assert torch.equal(pads[peer], expected_signals), "this rank did not signal each program"


def test_a_peer_that_never_arrives_flags_the_bounded_wait():
    buffers = [torch.zeros(1, 1, HIDDEN, device=DEVICE) for _ in range(2)]
    pads = [torch.zeros(2, dtype=torch.int32, device=DEVICE) for _ in range(2)]
    buffer_ptrs, pad_ptrs = table(buffers), table(pads)
    failed = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    residual, weight = randn(1, HIDDEN, seed=7), torch.ones(HIDDEN, device=DEVICE)
    args = (buffer_ptrs.data_ptr(), pad_ptrs.data_ptr(), 0, 0, 2, residual, weight, EPS, failed)
    allreduce_add_norm(*args, max_spins=3)
    assert failed.item() == 1, "a missing peer went unnoticed"


def one_rank_fused(hidden: int, max_rows: int) -> tuple[FusedAllReduceNorm, list[torch.Tensor]]:
    """The fused path over one rank (no peer: the barrier passes at once), on CPU tensors; the
    returned tensors must stay alive while it is used."""
    buffer = torch.zeros(2, max_rows, hidden, device=DEVICE)
    pads = torch.zeros(max_rows, dtype=torch.int32, device=DEVICE)
    ptrs, pad_ptrs = table([buffer]), table([pads])
    handle = SimpleNamespace(
        buffer_ptrs_dev=ptrs.data_ptr(),
        signal_pad_ptrs_dev=pad_ptrs.data_ptr(),
        rank=0,
        world_size=1,
    )
    return FusedAllReduceNorm(buffer, handle, all_reduce=lambda x: x), [
        buffer,
        pads,
        ptrs,
        pad_ptrs,
    ]


def join_all(runner: ModelRunner, fused: FusedAllReduceNorm) -> None:
    """As `ModelShard.install` joins a dense model's projections and norms."""
    body = runner.model.model
    after_mlp = [layer.input_layernorm for layer in body.layers[1:]] + [body.norm]
    for layer, norm in zip(body.layers, after_mlp):
        fused.join(layer.self_attn.o_proj, layer.post_attention_layernorm, ATTENTION)
        fused.join(layer.mlp.down_proj, norm, MLP)


@pytest.mark.parametrize("max_rows", [64, 4])  # 64: fused; 4: the 10-token step all-reduces
def test_decoder_joined_through_the_fused_path_equals_the_plain_decoder(tiny_llama_dir, max_rows):
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    runner.model.set_fused_kernels(True)
    expected = prefill_logits(runner, PROMPTS)
    fused, keep = one_rank_fused(runner.model.config.hidden_size, max_rows)
    join_all(runner, fused)
    torch.testing.assert_close(prefill_logits(runner, PROMPTS), expected, atol=1e-5, rtol=1e-5)
    assert bool(keep[0].any()) == (max_rows >= 10), "the projections wrote the buffer iff fused"


def test_a_partial_that_skips_its_norm_is_an_error(tiny_llama_dir):
    """A model that would hand the unreduced partial anywhere but to its norm fails loudly."""
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    runner.model.set_fused_kernels(True)
    fused, _keep = one_rank_fused(runner.model.config.hidden_size, 64)
    layer = runner.model.model.layers[0]
    fused.join(layer.self_attn.o_proj, layer.post_attention_layernorm, ATTENTION)
    x = torch.ones(2, layer.self_attn.o_proj.in_features, device=DEVICE)
    partial = layer.self_attn.o_proj(x)
    with pytest.raises(RuntimeError, match="did not go to its norm next"):
        layer.post_attention_layernorm(partial.clone(), torch.zeros_like(partial))


STEPS = 4  # fused all-reduces in a row: the slots alternate as o, down, o, down


@pytest.mark.slow
@pytest.mark.skipif(DEVICE.type != "cpu", reason="the two-process run uses the CPU interpreter")
def test_two_processes_meet_at_each_barrier_and_agree():
    """Two real ranks (processes) over shared memory, in Triton's interpreter: each writes its
    partial into the slot of the step and runs the kernel; every step's barrier must meet
    (no hang) and both ranks must return the same, correct sums."""
    import torch.multiprocessing as mp

    buffers = [torch.zeros(2, MAX_ROWS, HIDDEN).share_memory_() for _ in range(2)]
    pads = [torch.zeros(MAX_ROWS * 2, dtype=torch.int32).share_memory_() for _ in range(2)]
    partials = torch.randn(STEPS, 2, ROWS, HIDDEN, generator=torch.Generator().manual_seed(3))
    residual, weight = randn(ROWS, HIDDEN, seed=7), 1.0 + 0.3 * randn(HIDDEN, seed=8)
    results = torch.zeros(2, STEPS, 2, ROWS, HIDDEN).share_memory_()
    ranks = mp.start_processes(
        _rank_steps,
        args=(buffers, pads, partials, residual, weight, results),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not ranks.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ranks.processes:
                proc.kill()
            pytest.fail("a barrier never met")
    assert torch.equal(results[0], results[1]), "the ranks computed different sums"
    for step in range(STEPS):
        sums = partials[step, 0] + partials[step, 1]
        normed, summed = rms_norm(sums, weight, EPS, residual)
        torch.testing.assert_close(results[0, step, 1], summed, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(results[0, step, 0], normed, atol=1e-5, rtol=1e-5)
    assert not any(p.any() for p in pads), "a signal was left in a pad"


def _rank_steps(rank, buffers, pads, partials, residual, weight, results) -> None:
    """One rank of the test above (a spawned process; the interpreter from the environment)."""
    buffer_ptrs, pad_ptrs = table(buffers), table(pads)  # this process's mappings
    failed = torch.zeros(1, dtype=torch.int32)
    for step in range(STEPS):
        slot = step % 2
        buffers[rank][slot, :ROWS] = partials[step, rank]
        normed, summed = two_rank_add_norm(
            buffer_ptrs, pad_ptrs, slot, rank, residual, weight, failed
        )
        results[rank, step, 0], results[rank, step, 1] = normed, summed
    assert failed.item() == 0
