"""No Triton compile after the engine's warm-up (issue 17, "lean host loop").

Triton's JIT compiles one kernel per key (constexprs, dtypes, int arguments' 1 / divisible-by-16
specialization, pointers' 16-byte alignment, launch options); a key first met in a step stalls
it for a compile, or with a warm disk cache a module load. On the CPU the GPU's start-up is
rehearsed under the interpreter (`pegboard.core.bench.triton_keys`) and every launch's CUDA key
recorded (`pegboard.core.kernels.jit_keys`); on a GPU the compiles themselves are counted."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton.backends.nvidia", reason="triton without its CUDA backend")

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs TRITON_INTERPRET=1 (no GPU)")


@pytest.fixture
def recorder():
    from pegboard.core.kernels.jit_keys import KeyRecorder

    with KeyRecorder() as rec:
        yield rec


def _keys(rec, kernel: str) -> list[str]:
    return sorted(k.key for k in rec.keys() if k.kernel.endswith(kernel))


# ------------------------------------------------------------------ the recorder's keys


def _probe_kernel():
    """A kernel with an int argument specialized on (`n`) and one that is not (`m`)."""
    import triton
    import triton.language as tl

    @triton.jit(do_not_specialize=["m"])
    def probe(X, n, m, BLOCK: tl.constexpr):
        tl.store(X + tl.arange(0, BLOCK), tl.zeros([BLOCK], tl.float32) + n + m)

    return probe


@interpreter
def test_an_int_argument_keys_on_one_divisible_by_16_or_neither(recorder):
    probe, x = _probe_kernel(), torch.zeros(16)
    for n in (1, 16, 3, 32, 5):
        probe[(1,)](x, n, n, BLOCK=16)
    keys = _keys(recorder, "probe")
    assert [k.split(", ")[1] for k in keys] == ["n:i32", "n:i32:D", "n=1"]
    assert all(", m:i32, " in k for k in keys)  # do_not_specialize: one key for every value


@interpreter
def test_a_pointer_keys_on_its_16_byte_alignment_and_a_constexpr_on_its_value(recorder):
    probe, x = _probe_kernel(), torch.zeros(64)
    probe[(1,)](x, 2, 2, BLOCK=16)
    probe[(1,)](x[1:], 2, 2, BLOCK=16)  # 4 bytes off
    probe[(1,)](x[4:], 2, 2, BLOCK=32)  # 16 bytes off: aligned
    keys = _keys(recorder, "probe")
    assert [k.split(", ")[0] for k in keys] == ["X:*fp32", "X:*fp32:D", "X:*fp32:D"]
    assert sum("BLOCK=32" in k for k in keys) == 1


# ------------------------------------------------------------------ kernels


@interpreter
def test_gumbel_sampling_has_one_key_per_kernel_whatever_the_rows(recorder, monkeypatch):
    """`chunk_size` grows the chunks with the rows (H200, 151,936 tokens: 75, 38, 19 and 15
    chunks per row at 1, 56, 111 and 228 rows): the chunk count is not specialized on and
    `_pick`'s tile is the vocabulary's most chunks."""
    from pegboard.plugins.sampling import gumbel

    monkeypatch.setattr(gumbel, "TARGET_PROGRAMS", 8)  # chunks of 1, 2 and 4 blocks here
    chunks = set()
    for rows in (1, 3, 9):
        logits = torch.randn(rows, 4 * gumbel.BLOCK)
        chunks.add(-(-logits.shape[1] // gumbel.chunk_size(rows, logits.shape[1])))
        gumbel.argmax(logits)  # (the noiseless path: the same kernels, chunked alike)
    assert chunks == {4, 2, 1}
    assert len(_keys(recorder, ":_chunk_best")) == 1
    assert len(_keys(recorder, ":_pick")) == 1


def test_the_runners_upload_starts_every_part_16_byte_aligned():
    """Odd batches left the slots (after `n` positions) 8 bytes off: a second key for the
    kernels that read them (`store_kv`, rope + store)."""
    import numpy as np
    from pegboard.core.model_runner import _upload

    parts = {"positions": np.arange(3), "slots": np.arange(10, 15), "ids": np.arange(7, 8)}
    up = _upload(parts, torch.device("cpu"))
    assert all(t.data_ptr() % 16 == 0 for t in up.values())
    assert {k: t.tolist() for k, t in up.items()} == {k: v.tolist() for k, v in parts.items()}


# ------------------------------------------------------------------ the engine


@interpreter
def test_after_the_rehearsed_gpu_warm_up_a_varied_run_meets_no_new_triton_key():
    """Chunked prompts of 1-160 tokens, mixed steps, decode batches shrinking as requests of
    1-10 tokens finish, sampled / greedy / penalised / top-k rows: every key was met during
    start-up (graph warm-ups, the sampler's `warm_up`)."""
    from pegboard.core.bench.triton_keys import Workload, record

    recorder, outs = record(Workload(num_requests=24, prompt_lens=(1, 160), output_lens=(1, 10)))
    assert len(outs) == 24 and all(o.token_ids for o in outs)
    run = recorder.phases["run"]
    assert sum(run.values()) >= 20  # the sampler launched in the run's steps
    new = recorder.new_keys()
    assert not new, "met after the warm-up:\n" + "\n".join(map(str, new))


# ------------------------------------------------------------------ GPU: compiles counted


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_no_triton_kernel_compiles_after_the_engines_warm_up():
    """Qwen3-0.6B's shapes with random weights, the default graphs and sampler: 128 requests
    of 1-1,024 prompt tokens and 1-48 output tokens compile nothing after start-up. In a fresh
    process: kernels an earlier test compiled would hide a miss."""
    code = (
        "import json; from pegboard.core.bench.triton_keys import count_gpu_compiles; "
        "compiled, n = count_gpu_compiles(); print(json.dumps([compiled, n]))"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    torch.cuda.empty_cache()  # what earlier tests' engines left cached here is the check's too
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900
    )
    assert done.returncode == 0, done.stderr[-4000:]
    compiled, n = json.loads(done.stdout.strip().splitlines()[-1])
    assert n == 128
    assert not compiled, "compiled after the warm-up:\n" + "\n".join(map(str, compiled))
