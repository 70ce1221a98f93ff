"""One-shot all-reduce fused with the residual add and RMSNorm after it (tensor parallelism).

A row-parallel projection (o_proj, down_proj) leaves each rank a partial sum of the layer's
output; the decoder then adds it to the residual stream and normalises the sum. At decode
batch sizes each step is a few µs of latency, so one kernel does all of it: each program
(one row) waits at a barrier until every rank's partial is written, reads the row of every
rank's buffer directly (peer memory through its symmetric-memory pointer, over NVLink),
sums them in rank order in float32, rounds to the activation dtype (what the all-reduce
returns), adds the residual (rounded, as `x + residual` is), stores the new residual, and
normalises with `pegboard.core.kernels.norm`'s code and launch layout, so the fused path and
all-reduce + `rms_norm` should agree bit for bit.

The barrier, per program, uses the signal pads torch's symmetric memory allocates beside each
buffer (zeroed, one uint32 per (block, source rank)): a program sets its slot in each peer's
pad from 0 to 1 (spinning while the peer has not yet consumed the last signal), then consumes
each peer's signal in its own pad (1 to 0). Every pad returns to zero after each barrier, so
the kernel needs no host-side counter and replays in a CUDA graph. The store-before-signal
order is release/acquire at system scope. A wait gives up after `max_spins` retries and flags
it (`failed`): the start-up check bounds it, so a barrier that cannot work here turns the
fused path off instead of hanging the server. torch's `one_shot_all_reduce` ends with a second
barrier so a rank cannot overwrite its buffer while a peer still reads it; here the caller
alternates between two buffer slots instead (`pegboard.core.distributed.fused_norm`): a rank
writes a slot again only after its next fused kernel passed that kernel's barrier, which no
peer reaches before its previous kernel (the one reading the slot) has finished.

The pointer tables (`buffer_ptrs`, `signal_pads`) are device arrays of uint64 addresses, one
per rank (torch's `_SymmetricMemory.buffer_ptrs_dev` / `signal_pad_ptrs_dev`); the kernel
runs in Triton's CPU interpreter too, on CPU tensors' addresses, for the tests.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from pegboard.core.kernels.norm import store_normalised
from pegboard.core.kernels.pdl import launch_options, wait_for_inputs

#: Retries of one barrier signal on a step: practically unbounded (a slow peer is waited for).
NO_LIMIT = 2**31 - 1


@triton.jit
def _swap(flag, old: tl.constexpr, new: tl.constexpr, SEM: tl.constexpr, Failed, MAX_SPINS):
    """Spin until `flag` holds `old`, then set it to `new` (one atomic; at most MAX_SPINS
    retries, after which `Failed` is set: a peer that never came)."""
    seen = tl.atomic_cas(flag, old, new, sem=SEM, scope="sys")
    spins = 0
    while (seen != old) & (spins < MAX_SPINS):
        seen = tl.atomic_cas(flag, old, new, sem=SEM, scope="sys")
        spins += 1
    if seen != old:
        tl.store(Failed, 1)


@triton.jit
def _barrier(SignalPads, row, Failed, MAX_SPINS, RANK: tl.constexpr, WORLD: tl.constexpr):
    """Program `row` of every rank meets here (see the module docstring)."""
    pads = SignalPads.to(tl.pointer_type(tl.uint64))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            theirs = tl.load(pads + peer).to(tl.pointer_type(tl.int32))
            _swap(theirs + row * WORLD + RANK, 0, 1, "release", Failed, MAX_SPINS)
    mine = tl.load(pads + RANK).to(tl.pointer_type(tl.int32))
    for peer in tl.static_range(WORLD):
        if peer != RANK:
            _swap(mine + row * WORLD + peer, 1, 0, "acquire", Failed, MAX_SPINS)
    tl.debug_barrier()  # the acquiring thread's view is every thread's of the program


@triton.jit
def _allreduce_add_norm_kernel(
    BufferPtrs,
    SignalPads,
    offset,
    Residual,
    Weight,
    Out,
    ResidualOut,
    stride_r,
    stride_o,
    size,
    eps,
    Failed,
    max_spins,
    RANK: tl.constexpr,
    WORLD: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < size
    wait_for_inputs(PDL)  # the projection that wrote this rank's partial has completed
    _barrier(SignalPads, row, Failed, max_spins, RANK, WORLD)  # ... and so have every peer's
    buffers = BufferPtrs.to(tl.pointer_type(tl.uint64))
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for peer in tl.static_range(WORLD):  # rank order: every rank computes the same sum
        partial = tl.load(buffers + peer).to(Residual.dtype)
        part = tl.load(partial + offset + row * size + offs, mask=mask, other=0.0, volatile=True)
        acc += part.to(tl.float32)
    reduced = acc.to(ResidualOut.dtype.element_ty)  # what the all-reduce would return
    r = tl.load(Residual + row * stride_r + offs, mask=mask, other=0.0)
    x = (reduced.to(tl.float32) + r.to(tl.float32)).to(ResidualOut.dtype.element_ty)
    tl.store(ResidualOut + row * stride_o + offs, x, mask=mask)
    store_normalised(x, Weight, Out + row * stride_o, offs, mask, size, eps)


def allreduce_add_norm(
    buffer_ptrs: int,
    signal_pads: int,
    offset: int,
    rank: int,
    world_size: int,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    failed: torch.Tensor,
    max_spins: int = NO_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(weight * normalise(s + residual), s + residual)` where `s` is the sum over the ranks
    of each rank's partial `[rows, size]`, stored contiguously at element `offset` of its
    buffer (`buffer_ptrs`: the address of a uint64 array of every rank's buffer address;
    `signal_pads`: likewise, their signal pads, at least `rows * world_size` uint32 each).
    `residual` is `[rows, size]` with a unit stride along the row; the outputs are new
    contiguous tensors in its dtype. Every rank must call this with the same `rows`.
    `failed` (int32, one element) is set to 1 when a program gave up waiting for a peer after
    `max_spins` retries of one signal (the start-up check bounds them; a step does not)."""
    rows, size = residual.shape
    out = torch.empty(rows, size, dtype=residual.dtype, device=residual.device)
    new_residual = torch.empty_like(out)
    if rows:
        block = triton.next_power_of_2(size)
        _allreduce_add_norm_kernel[(rows,)](
            buffer_ptrs,
            signal_pads,
            offset,
            residual,
            weight,
            out,
            new_residual,
            residual.stride(0),
            out.stride(0),
            size,
            eps,
            failed,
            max_spins,
            RANK=rank,
            WORLD=world_size,
            BLOCK=block,
            num_warps=min(max(block // 512, 1), 16),  # as rms_norm: the same reduction tree
            **launch_options(residual.device),
        )
    return out, new_residual
