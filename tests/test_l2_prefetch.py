"""Weights prefetched into the L2 at decode (`core/kernels/l2_prefetch.py`, `PEGBOARD_L2_PREFETCH`).

One tiny kernel per site asks the L2 for the next GEMV's weights while small kernels run (after
the qkv GEMV: rope, attention, the reduce). It changes no arithmetic. On a CPU the interpreter
cannot run its PTX, so the CPU tests check which sites ask for which weight and when, and,
compiled for sm_90 in a subprocess, that the kernel issues its bulk prefetches before the PDL
trigger and wait. On the GPU: the tensor's bytes stay, a graph replays it, and greedy tokens
with every site on equal those without.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from pegboard.core.kernels import l2_prefetch  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.core.models.layers import Linear  # noqa: E402
from test_fused_kernels import DEVICE, PROMPTS, prefill_logits  # noqa: E402

MB = 2**20


def test_sites_are_off_by_default(monkeypatch):
    monkeypatch.delenv("PEGBOARD_L2_PREFETCH", raising=False)
    assert l2_prefetch.sites() == {}
    monkeypatch.setenv("PEGBOARD_L2_PREFETCH", "0")
    assert l2_prefetch.sites() == {}


def test_sites_take_whole_weights_or_their_first_megabytes(monkeypatch):
    monkeypatch.setenv("PEGBOARD_L2_PREFETCH", "o, gate_up=16,down=0.5")
    assert l2_prefetch.sites() == {"o": math.inf, "gate_up": 16 * MB, "down": MB / 2}


@pytest.mark.parametrize(
    "value, message", [("qkv", "unknown site 'qkv'"), ("o=lots", "'o=lots' is not name=megabytes")]
)
def test_a_bad_site_is_named(monkeypatch, value, message):
    monkeypatch.setenv("PEGBOARD_L2_PREFETCH", value)
    with pytest.raises(ValueError, match=message):
        l2_prefetch.sites()


def test_ahead_only_where_named_and_the_layer_has_a_weight(monkeypatch):
    monkeypatch.setenv("PEGBOARD_L2_PREFETCH", "o=8")
    layer = Linear(16, 16, bias=False)
    site = l2_prefetch.ahead("o", layer)
    assert site is not None and site.nbytes == 8 * MB and site.layer is layer
    assert l2_prefetch.ahead("down", layer) is None
    assert l2_prefetch.ahead("o", torch.nn.Identity()) is None  # no weight tensor


def test_ahead_asks_only_for_decode_batches_the_gemv_takes(monkeypatch):
    calls = []
    monkeypatch.setattr(l2_prefetch, "prefetch", lambda w, n, e, *a, **k: calls.append((w, n, e)))
    layer = Linear(16, 16, bias=False)
    site = l2_prefetch.Ahead(layer, 4 * MB, evict_last=True)
    site(l2_prefetch.MAX_ROWS + 1)
    assert calls == []
    site(1)
    assert calls == [(layer.weight, 4 * MB, True)]


def test_prefetch_issues_nothing_without_a_hopper_gpu():
    assert not l2_prefetch.usable(torch.zeros(4096))  # CPU, or the interpreter


def test_the_decoder_asks_for_each_layers_next_weights_in_order(tiny_llama_dir, monkeypatch):
    """With every site on, a decode step (2 rows) asks for layer i's o weights, then its gate/up,
    then its down, for every layer in turn; a prefill of 10 tokens asks for none; the logits
    are those without prefetching."""
    runner = ModelRunner(tiny_llama_dir, "float32", str(DEVICE), progress=False)
    runner.model.set_fused_kernels(True)
    expected = prefill_logits(runner, [[5, 9], [300, 2]])
    monkeypatch.setenv("PEGBOARD_L2_PREFETCH", "o,gate_up=1,down")
    runner.model.set_fused_kernels(True)
    asked = []
    monkeypatch.setattr(l2_prefetch, "prefetch", lambda w, n, *a, **k: asked.append((w, n)))
    logits = prefill_logits(runner, [[5, 9], [300, 2]])  # 4 rows: the GEMV's
    torch.testing.assert_close(logits, expected, atol=0, rtol=0)
    wanted = []
    for layer in runner.model.model.layers:
        wanted += [(layer.self_attn.o_proj.weight, math.inf), (layer.mlp.gate_up_proj.weight, MB)]
        wanted.append((layer.mlp.down_proj.weight, math.inf))
    assert [(id(w), n) for w, n in asked] == [(id(w), n) for w, n in wanted]
    asked.clear()
    prefill_logits(runner, PROMPTS)  # 10 rows
    assert asked == []
    runner.model.set_fused_kernels(False)
    assert runner.model.model.layers[0].self_attn.prefetch_o is None


_COMPILE = """
import json, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from pegboard.core.kernels import l2_prefetch
fn = l2_prefetch._prefetch_kernel
names = fn.arg_names
out = {}
for evict in (False, True):
    sig = {"Base": "*u8", "nbytes": "i64", "chunk": "i32", "PER_PROGRAM": "constexpr",
           "EVICT_LAST": "constexpr", "PDL": "constexpr"}
    consts = {(names.index("PER_PROGRAM"),): 32, (names.index("EVICT_LAST"),): evict,
              (names.index("PDL"),): True}
    src = ASTSource(fn, sig, consts, {(0,): [["tt.divisibility", 16]]})
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 1})
    ptx = kernel.asm["ptx"]
    out[str(evict)] = [ptx.find(s) for s in ("cp.async.bulk.prefetch.L2.global",
        "L2::evict_last", "griddepcontrol.launch_dependents", "griddepcontrol.wait")]
    out[str(evict)].append(len(kernel.asm["cubin"]))
print(json.dumps(out))
"""


def test_prefetch_compiles_for_sm90_and_prefetches_before_the_pdl_wait():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", _COMPILE], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    found = __import__("json").loads(done.stdout.strip().splitlines()[-1])
    prefetch, evict, trigger, wait, cubin = found["False"]
    assert 0 < prefetch < trigger < wait and evict == -1 and cubin > 0
    prefetch, evict, trigger, wait, cubin = found["True"]
    assert 0 < evict < trigger < wait and prefetch > 0 and cubin > 0


# ------------------------------------------------------------------ GPU

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("evict_last", [False, True])
def test_gpu_prefetch_leaves_the_bytes_and_replays_in_a_graph(evict_last):
    """Whole tensors, their first bytes, sizes off the chunk, eager and captured: the bytes
    after are the bytes before (the kernel reads nothing into registers and writes nothing)."""
    for numel in (64 * MB // 2, 3 * 16384 // 2 + 8, 24):
        weight = torch.randn(numel, device="cuda", dtype=torch.bfloat16)
        before = weight.clone()
        l2_prefetch.prefetch(weight, evict_last=evict_last)
        l2_prefetch.prefetch(weight, nbytes=20000, evict_last=evict_last)
        l2_prefetch.prefetch(weight, nbytes=MB / 3, evict_last=evict_last)  # MB from the flag
        l2_prefetch.prefetch(weight, evict_last=evict_last, lines=True, per_program=256)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            l2_prefetch.prefetch(weight, evict_last=evict_last)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(weight, before)


@pytest.mark.gpu
@gpu
def test_gpu_graph_decode_with_every_site_equals_without(tiny_llama_dir, monkeypatch):
    """Greedy tokens of a CUDA-graph decode with o, gate/up and down prefetched equal those
    without, and the prefetch kernel was launched."""
    from test_cuda_graph import _generate, _prompts

    monkeypatch.delenv("PEGBOARD_L2_PREFETCH", raising=False)
    plain, _, _ = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype="bfloat16")
    launches = []
    real = l2_prefetch.prefetch
    monkeypatch.setattr(
        l2_prefetch, "prefetch", lambda *a, **k: launches.append(1) or real(*a, **k)
    )
    monkeypatch.setenv("PEGBOARD_L2_PREFETCH", "o,gate_up=1,down")
    ahead, graphs, _ = _generate(tiny_llama_dir, _prompts(3), attention="triton", dtype="bfloat16")
    assert graphs and graphs[0].num_replays >= 15
    assert launches and ahead == plain
