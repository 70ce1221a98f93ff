"""What tinygemm's bf16 scales and zeros cost in accuracy, measured on CPU.

The CUDA kernel de-quantizes with one bf16 fma, `bf16((q - 8) * scale + zero)` with bf16 scale
and zero (int4mm.cu: `__hfma2`), then multiplies on the tensor cores with float32 sums: that is
`tinygemm_layout.dequantize_tinygemm(p, bf16)` times x, emulated here ("tinygemm"). torch's CPU
twin (`_weight_int4pack_mm_for_cpu`, run here too, "CPU op") keeps the de-quantized weights in
float32, so it is slightly more exact than the GPU.

1. Random layers (Gaussian weights rounded to 4 bits per group, float16 scales as checkpoints
   store them): relative error of `x @ W.T` against float64, bf16 x and output, for the serving
   layout's numerics (the de-quantized weights rounded once to bf16: what pegboard's Triton
   kernels and a de-quantized bf16 checkpoint multiply) and for tinygemm.
2. The bundled SmolLM2-135M served natively 4-bit (`--quantization gguf`, Q4_1, group 32):
   its logits over a 40-token prompt against its float32 run, in bf16 with the serving
   numerics and with tinygemm's weights (every projection).
3. The tests' tiny random Llama quantized GPTQ g32 (sym, asym): the model on which rounding
   scales and offsets to bf16 cost 1.8x bf16's logit error (docs/quantization.md; that rounding
   is emulated again here, "bf16 offsets"), with tinygemm's weights.

    python3 scripts/tinygemm_accuracy.py   # ~1-2 minutes on two cores
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fixtures.quantized import rtn  # noqa: E402
from pegboard.core.kernels import w4a16_tinygemm  # noqa: E402
from pegboard.plugins.linear.int4 import Int4Weights, dequantize_packed, pack  # noqa: E402
from pegboard.plugins.linear.tinygemm_layout import (  # noqa: E402
    dequantize_tinygemm,
    scales_and_zeros,
    to_tinygemm,
)


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref).norm() / ref.norm()).item()


def exact_in_bf16(p) -> bool:
    sz = scales_and_zeros(p, p.group_size)
    return torch.equal(sz.to(torch.bfloat16).float(), sz)


def random_layers() -> None:
    print("random layers 2048 x 4096, 16 rows; relative error vs float64 (bf16 x):")
    gen = torch.Generator().manual_seed(0)
    for group in (32, 128):
        for sym in (True, False):
            w = torch.randn(2048, 4096, generator=gen) * 0.02
            q, scales, zeros = rtn(w, group, sym)[:3]
            weights = Int4Weights(q.to(torch.uint8), scales, -zeros * scales, group)
            p = pack(weights, torch.bfloat16)
            t = to_tinygemm(p)
            x = torch.randn(16, 4096, generator=gen).bfloat16()
            ref = x.double() @ weights.dequantize().double().t()
            serving = (x.float() @ dequantize_packed(p, torch.bfloat16).float().t()).bfloat16()
            tiny = (x.float() @ dequantize_tinygemm(p, torch.bfloat16).float().t()).bfloat16()
            cpu = w4a16_tinygemm.tinygemm_linear(x, t.qweight, t.scales_and_zeros, t.group_size)
            a, b, c = rel(serving, ref), rel(tiny, ref), rel(cpu, ref)
            print(
                f"  g{group:<4} {'sym ' if sym else 'asym'}  serving {a:.2e}  tinygemm {b:.2e} "
                f"({b / a:.2f}x)  CPU op {c:.2e} ({c / a:.2f}x); scales and zeros exact in "
                f"bf16: {exact_in_bf16(p)}"
            )


def smollm2() -> None:
    from pegboard.core.llm import LLM
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
    from pegboard.plugins.linear.int4 import PackedInt4
    from pegboard.plugins.linear.w4a16 import Int4Linear
    from pegboard.sdk.types import KVPool, Request

    prompt = list(range(1000, 1040))

    def logits(dtype: str, tinygemm: bool) -> torch.Tensor:
        with LLM(None, dtype=dtype, device="cpu", quantization="gguf") as llm:
            runner = llm.engine.runner
            layers = [m for m in runner.model.modules() if isinstance(m, Int4Linear)]
            for m in layers:
                if tinygemm and m.qweight is not None:  # the weights the CUDA kernel multiplies
                    p = PackedInt4(m.qweight, m.scales, m.offsets, m.group_size, None)
                    m.weight = dequantize_tinygemm(p, torch.bfloat16).contiguous()
            return _forward(runner, prompt, TorchAttentionBackend, KVPool, Request)

    oracle = logits("float32", False)
    serving, tiny = logits("bfloat16", False), logits("bfloat16", True)
    a, b = rel(serving, oracle), rel(tiny, oracle)
    agree = (serving.argmax(-1) == oracle.argmax(-1)).float().mean().item()
    agree_t = (tiny.argmax(-1) == oracle.argmax(-1)).float().mean().item()
    print("SmolLM2-135M Q4_1 (g32), 40-token prompt, logits vs its float32 run:")
    print(f"  bf16 serving numerics  {a:.2e}  (argmax agrees at {agree:.0%} of positions)")
    print(f"  bf16 tinygemm          {b:.2e}  ({b / a:.2f}x; argmax agrees at {agree_t:.0%})")


def tiny_llama() -> None:
    import tempfile

    from fixtures import build_tiny_model
    from fixtures.quantized import quantize_checkpoint
    from pegboard.core.model_runner import ModelRunner
    from pegboard.core.models.quantization import builtin_linear, detect_quantization
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
    from pegboard.plugins.linear.int4 import PackedInt4
    from pegboard.plugins.linear.w4a16 import Int4Linear
    from pegboard.sdk.types import KVPool, Request

    def weights_of(p: PackedInt4, how: str) -> torch.Tensor:
        if how == "tinygemm":
            return dequantize_tinygemm(p, torch.bfloat16)
        # the first version's layout: scales and offsets rounded to bf16, then q * s + o
        q = PackedInt4(p.qweight, p.scales.bfloat16(), p.offsets.bfloat16(), p.group_size, None)
        return dequantize_packed(q, torch.bfloat16)

    def logits(model_dir, dtype: str, how: str | None = None) -> torch.Tensor:
        kwargs = {}
        if how is not None:
            kwargs["linear"] = builtin_linear(detect_quantization(model_dir, None))
        runner = ModelRunner(model_dir, dtype, "cpu", progress=False, **kwargs)
        for m in runner.model.modules():
            if how is not None and isinstance(m, Int4Linear) and m.qweight is not None:
                p = PackedInt4(m.qweight, m.scales, m.offsets, m.group_size, None)
                w = weights_of(p, how)
                m.weight = (w if m.perm is None else w[:, torch.argsort(m.perm)]).contiguous()
        prompt = list(range(5, 37))
        return _forward(runner, prompt, TorchAttentionBackend, KVPool, Request)

    print("tiny random Llama (hidden 128), GPTQ g32, 32-token prompt, logits vs float32:")
    with tempfile.TemporaryDirectory() as tmp:
        src = build_tiny_model(Path(tmp) / "llama", "llama", hidden_size=128,
                               intermediate_size=256)  # fmt: skip
        for sym in (True, False):
            q_dir, deq_dir = quantize_checkpoint(src, Path(tmp) / f"gptq-{sym}", "gptq", sym=sym)
            oracle = logits(deq_dir, "float32")
            base = rel(logits(deq_dir, "bfloat16"), oracle)
            old = rel(logits(q_dir, "bfloat16", "bf16 offsets"), oracle)
            tiny = rel(logits(q_dir, "bfloat16", "tinygemm"), oracle)
            print(
                f"  {'sym ' if sym else 'asym'}  bf16 de-quantized {base:.2e}  bf16 offsets "
                f"{old:.2e} ({old / base:.2f}x)  tinygemm {tiny:.2e} ({tiny / base:.2f}x)"
            )


def _forward(runner, prompt, backend, kv_pool, request_type) -> torch.Tensor:
    pool = kv_pool.allocate(runner.info, 4, 16)
    runner.set_attention(backend(runner.info, pool))
    r = request_type(prompt_token_ids=prompt)
    r.page_table = list(range(-(-len(prompt) // 16)))
    batch = runner.prepare([r], [len(prompt)], 16)
    batch.logits_indices = torch.arange(len(prompt))
    return runner.forward(batch).double()


if __name__ == "__main__":
    torch.set_num_threads(2)
    random_layers()
    smollm2()
    tiny_llama()
