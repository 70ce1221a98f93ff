"""Fused Triton kernels (`pegboard.core.kernels`) against the PyTorch ops of the model they
replace (`RMSNorm`, `silu_and_mul`, `RotaryEmbedding`), and the decoder running with them.

Without a GPU the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
Triton is imported) on small float32 shapes, where they must equal the PyTorch ops to float32
rounding. The `gpu` tests check bf16 at the real models' shapes against a float32 reference
(the interpreter truncates float32 -> bf16 casts instead of rounding to nearest, so bf16 is
checked on the GPU only), and that the fused decoder needs no host synchronisation (so CUDA
graphs can capture it).
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures import PageAllocator  # noqa: E402
from pegboard.core import kernels  # noqa: E402
from pegboard.core.kernels.activation import silu_and_mul  # noqa: E402
from pegboard.core.kernels.norm import rms_norm  # noqa: E402
from pegboard.core.kernels.rotary import rotary_embedding  # noqa: E402
from pegboard.core.model_runner import ModelRunner  # noqa: E402
from pegboard.core.models.config import RopeConfig  # noqa: E402
from pegboard.core.models.layers import RMSNorm  # noqa: E402
from pegboard.core.models.layers import silu_and_mul as torch_silu_and_mul  # noqa: E402
from pegboard.core.models.rope import RotaryEmbedding  # noqa: E402
from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend  # noqa: E402
from pegboard.sdk.types import KVPool, Request  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP32 = {"atol": 1e-5, "rtol": 1e-5}  # float32 rounding (GPU rsqrt/exp are a few ulp apart)
LLAMA3_ROPE = RopeConfig(500000.0, "llama3", 8.0, 1.0, 4.0, 64)


def randn(*shape: int, dtype: torch.dtype = torch.float32, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def make_norm(size: int, dtype: torch.dtype = torch.float32, eps: float = 1e-6) -> RMSNorm:
    norm = RMSNorm(size, eps).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(1.0 + 0.3 * randn(size, seed=99))
    return norm.to(dtype)


def make_rope(head_dim: int, rope: RopeConfig = LLAMA3_ROPE, max_len: int = 256):
    return RotaryEmbedding(rope, head_dim, max_len).to(DEVICE)


def qkv_views(tokens: int, heads: int, kv_heads: int, head_dim: int, dtype=torch.float32):
    """A fused qkv output and its q, k, v views, as the attention layer splits it."""
    qkv = randn(tokens, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=3)
    q, k, v = qkv.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim], dim=-1)
    return (
        qkv,
        q.view(tokens, heads, head_dim),
        k.view(tokens, kv_heads, head_dim),
        v.view(tokens, kv_heads, head_dim),
    )


def positions(tokens: int, max_len: int = 256) -> torch.Tensor:
    gen = torch.Generator().manual_seed(5)
    return torch.randint(0, max_len, (tokens,), generator=gen).to(DEVICE)


# ------------------------------------------------------------------ kernels, float32


@pytest.mark.parametrize("size", [64, 48])
def test_rms_norm_equals_the_model_norm(size):
    norm = make_norm(size)
    x = randn(5, size)
    torch.testing.assert_close(rms_norm(x, norm.weight, norm.eps), norm(x), **FP32)


def test_add_rms_norm_returns_the_normalised_sum_and_the_sum():
    norm = make_norm(40)
    x, residual = randn(3, 2, 40), randn(3, 2, 40, seed=1)
    normed, new_residual = rms_norm(x, norm.weight, norm.eps, residual)
    expected_normed, expected_residual = norm(x, residual)
    assert normed.shape == new_residual.shape == x.shape
    torch.testing.assert_close(new_residual, expected_residual, atol=0, rtol=0)
    torch.testing.assert_close(normed, expected_normed, **FP32)


def test_silu_and_mul_equals_torch_across_blocks():
    gate_up = randn(3, 2 * 1100)  # two 1024-wide blocks per row, the second partly masked
    out = silu_and_mul(gate_up)
    assert out.shape == (3, 1100)
    torch.testing.assert_close(out, torch_silu_and_mul(gate_up), **FP32)


@pytest.mark.parametrize(
    ("heads", "kv_heads", "head_dim", "rope"),
    [(4, 2, 16, LLAMA3_ROPE), (3, 1, 24, RopeConfig(10000.0))],
)
def test_rotary_in_place_on_qkv_views_equals_the_model_rope(heads, kv_heads, head_dim, rope):
    rotary = make_rope(head_dim, rope)
    qkv, q, k, v = qkv_views(6, heads, kv_heads, head_dim)
    v_before = v.clone()
    pos = positions(6)
    expected_q, expected_k = rotary(pos, q.clone(), k.clone())
    rotary_embedding(pos, q, k, rotary.cos, rotary.sin)
    torch.testing.assert_close(q, expected_q, **FP32)
    torch.testing.assert_close(k, expected_k, **FP32)
    torch.testing.assert_close(v, v_before, atol=0, rtol=0)


def test_rotary_with_qk_norm_equals_norm_then_rope():
    rotary = make_rope(32, RopeConfig(1000000.0))
    q_norm, k_norm = make_norm(32), make_norm(32)
    with torch.no_grad():
        k_norm.weight.mul_(0.5)  # q and k have their own weights
    _, q, k, _ = qkv_views(5, 4, 2, 32)
    pos = positions(5)
    expected_q, expected_k = rotary(pos, q_norm(q), k_norm(k))
    rotary_embedding(pos, q, k, rotary.cos, rotary.sin, q_norm.weight, k_norm.weight, 1e-6)
    torch.testing.assert_close(q, expected_q, **FP32)
    torch.testing.assert_close(k, expected_k, **FP32)


def test_rotary_needs_both_norm_weights_or_neither():
    rotary = make_rope(16)
    _, q, k, _ = qkv_views(2, 4, 2, 16)
    with pytest.raises(ValueError, match="both q and k norm weights"):
        rotary_embedding(positions(2), q, k, rotary.cos, rotary.sin, make_norm(16).weight)


# ------------------------------------------------------------------ the decoder


def prefill_logits(runner: ModelRunner, prompts: list[list[int]]) -> torch.Tensor:
    """Logits of the last token of each prompt, prefilled in one step on a fresh KV pool."""
    pool = KVPool.allocate(runner.info, 64, 4)
    runner.set_attention(TorchAttentionBackend(runner.info, pool))
    alloc = PageAllocator(64, 4)
    requests = [Request(prompt_token_ids=p) for p in prompts]
    for r in requests:
        alloc.grow(r, r.num_tokens)
    return runner.forward(runner.prepare(requests, [r.num_tokens for r in requests], 4))


PROMPTS = [[5, 9, 200, 17, 33, 8, 41], [300, 2, 77]]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_decoder_with_fused_kernels_equals_the_pytorch_decoder(tiny_model_dirs, arch):
    runner = ModelRunner(tiny_model_dirs[arch], "float32", str(DEVICE), progress=False)
    runner.model.set_fused_kernels(False)
    expected = prefill_logits(runner, PROMPTS)
    runner.model.set_fused_kernels(True)
    assert runner.model.fused_kernels
    torch.testing.assert_close(prefill_logits(runner, PROMPTS), expected, atol=1e-4, rtol=1e-4)


def test_fused_kernels_stay_off_on_cpu(tiny_llama_dir):
    runner = ModelRunner(tiny_llama_dir, "float32", "cpu", progress=False, fused_kernels=True)
    assert not runner.model.fused_kernels
    assert "CUDA device" in kernels.unavailable_reason(torch.device("cpu"))


# ------------------------------------------------------------------ GPU, bf16, real shapes

LLAMA_8B = {"hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "head_dim": 128}
QWEN3_06B = {"hidden": 1024, "intermediate": 3072, "heads": 16, "kv_heads": 8, "head_dim": 128}


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [LLAMA_8B, QWEN3_06B], ids=["llama-8b", "qwen3-0.6b"])
@pytest.mark.parametrize("rows", [1, 256])
def test_gpu_bf16_norm_and_silu_match_float32(shape, rows):
    hidden, inter = shape["hidden"], shape["intermediate"]
    norm = make_norm(hidden, torch.bfloat16, eps=1e-5)
    x = randn(rows, hidden, dtype=torch.bfloat16)
    residual = randn(rows, hidden, dtype=torch.bfloat16, seed=1)
    normed, new_residual = rms_norm(x, norm.weight, norm.eps, residual)
    torch.testing.assert_close(new_residual, x + residual, atol=0, rtol=0)
    norm32 = make_norm(hidden, eps=1e-5)
    assert relative_error(normed, norm32(new_residual.float())) < 1e-2
    assert relative_error(normed, norm(new_residual)) < 1e-2
    gate_up = randn(rows, 2 * inter, dtype=torch.bfloat16, seed=2)
    out = silu_and_mul(gate_up)
    assert relative_error(out, torch_silu_and_mul(gate_up.float())) < 1e-2
    assert relative_error(out, torch_silu_and_mul(gate_up)) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("rows", [1, 256])
def test_gpu_bf16_rotary_matches_float32(qk_norm, rows):
    shape = QWEN3_06B if qk_norm else LLAMA_8B
    heads, kv_heads, head_dim = shape["heads"], shape["kv_heads"], shape["head_dim"]
    rotary = make_rope(head_dim, max_len=4096)
    _, q, k, _ = qkv_views(rows, heads, kv_heads, head_dim, torch.bfloat16)
    pos = positions(rows, 4096)
    q_norm = k_norm = None
    q32, k32 = q.float(), k.float()
    if qk_norm:
        q_norm, k_norm = make_norm(head_dim), make_norm(head_dim)
        q32, k32 = q_norm(q32), k_norm(k32)
        q_norm, k_norm = q_norm.to(torch.bfloat16), k_norm.to(torch.bfloat16)
    expected_q, expected_k = rotary(pos, q32, k32)
    rotary.set_fused_kernels(True)
    rotary.rotate_in_place(pos, q, k, q_norm, k_norm)
    assert relative_error(q, expected_q) < 2e-2
    assert relative_error(k, expected_k) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_gpu_loader_switches_fused_kernels_and_bf16_logits_agree(tiny_model_dirs, arch):
    fused = ModelRunner(tiny_model_dirs[arch], "bfloat16", "cuda", progress=False)
    plain = ModelRunner(
        tiny_model_dirs[arch], "bfloat16", "cuda", progress=False, fused_kernels=False
    )
    assert fused.model.fused_kernels and not plain.model.fused_kernels
    expected = prefill_logits(plain, PROMPTS)
    assert relative_error(prefill_logits(fused, PROMPTS), expected) < 2e-2


@pytest.mark.gpu
def test_gpu_fused_decoder_layers_never_synchronise(tiny_model_dirs):
    runner = ModelRunner(tiny_model_dirs["qwen3"], "bfloat16", "cuda", progress=False)
    prefill_logits(runner, PROMPTS)  # compile the kernels first
    model = runner.model
    hidden = model.model.embed_tokens(torch.tensor([5, 9, 200], device="cuda"))
    pos = torch.tensor([0, 1, 2], device="cuda")
    layer = model.model.layers[0]
    torch.cuda.set_sync_debug_mode("error")
    try:
        normed, residual = layer.input_layernorm(hidden, hidden)
        qkv = layer.self_attn.qkv_proj(normed)
        q, k, _ = qkv.split(layer.self_attn.split, dim=-1)
        model.model.rotary_emb.rotate_in_place(
            pos,
            q.view(3, -1, model.config.head_dim),
            k.view(3, -1, model.config.head_dim),
            layer.self_attn.q_norm,
            layer.self_attn.k_norm,
        )
        layer.mlp(normed)
    finally:
        torch.cuda.set_sync_debug_mode("default")
