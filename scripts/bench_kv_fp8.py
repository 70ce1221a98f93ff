"""FP8 KV cache against the model-dtype KV cache: accuracy on the bundled SmolLM2, and the
attention kernels' speed on a GPU.

Accuracy (default), over a fixed prompt set (chat-formatted questions), per choice of FP8
scales (`1.0`, and `calibrated`: per layer, the K/V amax of a separate calibration text
/ 224, so the largest values sit a factor 2 below e4m3's 448 and small values stay out of
e4m3's subnormal range):
- greedy agreement: each prompt is generated greedily (`--max-tokens`) with the model-dtype
  KV and with FP8 KV; reported: the share of identical completions and the mean share of
  identical leading tokens;
- mean KL: the model-dtype completion is fed back teacher-forced through both KV caches (prompt
  + completion in chunks of `--chunk` tokens, so later chunks attend over cached FP8 keys and
  values); reported: the mean KL(p_auto || p_fp8) of the next-token distributions over the
  completion's positions, and their top-1 agreement.

`--e4m3-dots`: the FP8 runs' decode steps attend as the e4m3 tensor-core kernel does over
`--kv-cache-layout hdp` (query and probabilities quantized to e4m3 too; `decode_fp8mma.py`),
through its PyTorch twin `reference_decode_fp8mma` (checked against the kernel to 2e-7), so
the accuracy of that design is measured on a CPU; `--chunk 0` feeds the teacher-forced prompt
in one prefill and every completion token as a decode step, as serving does (prefill and
extend keep 16-bit dots, as the engine does).

`--kernels` (CUDA): µs per decode-attention call (CUDA-graph replays, KV pages scattered) with
a bf16 cache, an FP8 cache read through float16 dots (the default) and through bf16 dots (the
first FP8 version), and both caches through the CUDA-core variant (`fma`), on the nano-vllm
workload's shape and two Llama-3.1-8B ones.

    python3 scripts/bench_kv_fp8.py [--device cuda] [--attention triton] [--json FILE]
        [--write-scales FILE] [--e4m3-dots --chunk 1]   (the calibrated scales, for `--kv-cache-scales FILE`)
    python3 scripts/bench_kv_fp8.py --kernels [--json FILE]

On CUDA the model runs in bf16 with the Triton attention backend; on CPU in float32 with the
torch backend.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from pegboard.core.default_model import default_model_dir
from pegboard.core.model_runner import ModelRunner
from pegboard.sdk.types import KVPool, Request, kv_dtype

QUESTIONS = [
    "What is the capital of France?",
    "Explain photosynthesis in two sentences.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Name three programming languages and one use of each.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
    "Summarise the plot of Romeo and Juliet.",
    "What are the planets of the solar system?",
    "How do vaccines work?",
    "Translate 'good morning' into Spanish, French and German.",
    "What causes the seasons on Earth?",
    "Describe a cat to someone who has never seen one.",
    "What is the difference between weather and climate?",
    "List the first ten prime numbers.",
    "Why do we sleep?",
]
#: Calibration text for the `calibrated` scales (not one of the evaluation prompts).
CALIBRATION = (
    "The history of the printing press begins in the fifteenth century. Johannes Gutenberg "
    "combined movable metal type, oil-based ink and a wooden screw press, and within decades "
    "printed books spread across Europe, changing science, religion and politics. Today we "
    "read on screens, but the ideas of standard type, layout and mass copies remain."
)
FP8_MAX = 448.0
CALIBRATION_HEADROOM = 2.0


def step(runner: ModelRunner, request: Request, n: int, page_size: int) -> torch.Tensor:
    """Run the next `n` tokens of `request` (already attached to the runner's backend and
    pool); the logits of each, float32 on the CPU."""
    batch = runner.prepare([request], [n], page_size)
    start = request.num_computed_tokens
    batch.logits_indices = torch.arange(n, device=runner.device)
    batch.samples = [True]
    out = runner.forward(batch).float().cpu()
    request.num_computed_tokens = start + n
    return out


def teacher_forced_logits(
    runner, backend_cls, pool: KVPool, seq: list[int], chunk: int, first: int | None = None
):
    """Logits `[len(seq), vocab]`, fed in chunks so later tokens attend over the cache (the
    first chunk `first` tokens when given: a prompt in one prefill, then its completion)."""
    runner.set_attention(backend_cls(runner.info, pool))
    request = Request(prompt_token_ids=seq)
    request.page_table = list(range(-(-len(seq) // pool.page_size)))
    out = []
    while request.num_computed_tokens < len(seq):
        n = first if first and not out else chunk
        out.append(step(runner, request, min(n, len(seq) - request.num_computed_tokens), 16))
    return torch.cat(out)


def make_pool(runner, name: str, tokens: int, scales=None) -> KVPool:
    pool = KVPool.allocate(
        runner.info, -(-tokens // 16) + 1, 16, dtype=kv_dtype(name, runner.info.dtype)
    )
    if scales is not None:
        pool.k_scales, pool.v_scales = list(scales[0]), list(scales[1])
    return pool


def greedy(runner, backend_cls, pool: KVPool, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy completion of `prompt` with this pool (one request, prefill then decode)."""
    runner.set_attention(backend_cls(runner.info, pool))
    request = Request(prompt_token_ids=list(prompt))
    request.page_table = list(range(pool.num_pages))
    logits = step(runner, request, len(prompt), pool.page_size)[-1]
    out = []
    for _ in range(max_tokens):
        token = int(logits.argmax())
        out.append(token)
        request.append_token(token)
        logits = step(runner, request, 1, pool.page_size)[-1]
    return out


def e4m3_dots_backend(base: type) -> type:
    """`base` whose decode steps (one new token per request) over an FP8 pool attend as the
    e4m3 tensor-core decode kernel does (`reference_decode_fp8mma`, block of 128 keys as
    `FP8_MMA_DEFAULTS`, one split); everything else, storing K/V included, is `base`'s."""
    from pegboard.plugins.kernels.triton_attention.decode_fp8mma import reference_decode_fp8mma

    class E4m3DotsBackend(base):
        def forward(self, layer, q, k, v):
            out = super().forward(layer, q, k, v)
            batch = self.batch
            if not self.pool.is_fp8 or any(n != 1 for n in batch.query_lens_cpu):
                return out
            width = max(map(len, batch.page_tables_cpu))
            table = torch.tensor([t + [0] * (width - len(t)) for t in batch.page_tables_cpu])
            seq_lens = torch.tensor(batch.seq_lens_cpu)
            got = reference_decode_fp8mma(
                q, self.pool.k[layer], self.pool.v[layer], table, seq_lens,
                self.scale * self.pool.k_scale(layer), 1, 128,
            )  # fmt: skip
            return (got * self.pool.v_scale(layer)).to(q.dtype)

    return E4m3DotsBackend


def calibrated_scales(runner, backend_cls, tokens: list[int]) -> tuple[list[float], list[float]]:
    """Per layer, the K and V amax over `tokens` (run with the model-dtype KV) times the
    headroom, over e4m3's largest value."""
    pool = make_pool(runner, "auto", len(tokens))
    teacher_forced_logits(runner, backend_cls, pool, tokens, len(tokens))
    k = [float(t.float().abs().max()) * CALIBRATION_HEADROOM / FP8_MAX for t in pool.k]
    v = [float(t.float().abs().max()) * CALIBRATION_HEADROOM / FP8_MAX for t in pool.v]
    return k, v


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def accuracy(args) -> dict:
    from transformers import AutoTokenizer

    cuda = args.device.startswith("cuda")
    attention = args.attention or ("triton" if cuda else "torch")
    dtype = "bfloat16" if cuda else "float32"
    if attention == "triton":
        from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend as Backend
    else:
        from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend as Backend
    if args.e4m3_dots:  # (model-dtype pools: the base backend's path unchanged)
        Backend = e4m3_dots_backend(Backend)
    model_dir = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, return_dict=False
        )
        for q in QUESTIONS[: args.num_prompts]
    ]
    runner = ModelRunner(model_dir, dtype, args.device, progress=False)
    calibration = calibrated_scales(runner, Backend, tokenizer.encode(CALIBRATION))
    if args.write_scales:  # for `pegboard serve --kv-cache-dtype fp8_e4m3 --kv-cache-scales`
        scales = {"k_scales": calibration[0], "v_scales": calibration[1]}
        args.write_scales.write_text(json.dumps(scales, indent=1) + "\n")
    length = max(map(len, prompts)) + args.max_tokens
    reference = [
        greedy(runner, Backend, make_pool(runner, "auto", length), p, args.max_tokens)
        for p in prompts
    ]
    result = {
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({_cpu_name()})",
        "date": time.strftime("%Y-%m-%d"),
        "model": model_dir.name,
        "attention": attention,
        "e4m3_dots": args.e4m3_dots,
        "chunk": args.chunk,
        "dtype": dtype,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "calibration_k_scales": calibration[0],
        "calibration_v_scales": calibration[1],
    }
    for label, scales in (("scales_1", None), ("scales_calibrated", calibration)):
        same, prefix, kls, top1 = [], [], [], []
        for prompt, ref in zip(prompts, reference):
            got = greedy(runner, Backend, make_pool(runner, "fp8_e4m3", length, scales), prompt,
                         args.max_tokens)  # fmt: skip
            same.append(got == ref)
            n = next((i for i, (x, y) in enumerate(zip(ref, got)) if x != y), len(ref))
            prefix.append(n / max(len(ref), 1))
            seq = prompt + ref
            logits = {
                name: teacher_forced_logits(
                    runner,
                    Backend,
                    make_pool(runner, name, len(seq), s),
                    seq,
                    args.chunk or 1,
                    None if args.chunk else len(prompt),
                )  # fmt: skip
                for name, s in (("auto", None), ("fp8_e4m3", scales))
            }
            rows = slice(len(prompt) - 1, len(seq) - 1)  # predicting the completion's tokens
            want = torch.log_softmax(logits["auto"][rows], -1)
            have = torch.log_softmax(logits["fp8_e4m3"][rows], -1)
            kls.append(float((want.exp() * (want - have)).sum(-1).mean()))
            top1.append(float((want.argmax(-1) == have.argmax(-1)).float().mean()))
        result[label] = {
            "greedy_identical_completions": sum(same) / len(same),
            "greedy_mean_identical_prefix": sum(prefix) / len(prefix),
            "teacher_forced_mean_kl": sum(kls) / len(kls),
            "teacher_forced_top1_agreement": sum(top1) / len(top1),
        }
        print(label, json.dumps(result[label]), flush=True)
    return result


def kernels() -> dict:
    """Decode attention, bf16 cache vs FP8 (float16 dots, bf16 dots), on a CUDA GPU."""
    import triton
    from bench_gemv import graph_us  # scripts/bench_gemv.py (same folder)
    from pegboard.plugins.kernels import triton_attention
    from pegboard.plugins.kernels.triton_attention import decode_attention as decode

    cases = {  # name: (heads, kv heads, requests, context)
        "qwen3-0.6b 256 x 850 (nano-vllm)": (16, 8, 256, 850),
        "llama-8b 64 x 1024": (32, 8, 64, 1024),
        "llama-8b 1 x 32768": (32, 8, 1, 32768),  # KV over the L2 cache
    }
    dev, rows = torch.device("cuda"), []
    for name, (heads, kv_heads, requests, context) in cases.items():
        pages_per = -(-context // 16)
        num_pages = requests * pages_per
        table = torch.randperm(num_pages, device=dev).view(requests, pages_per).int()
        seq_lens = torch.full((requests,), context, dtype=torch.int32, device=dev)
        q = torch.randn(requests, heads, 128, device=dev, dtype=torch.bfloat16)
        out = torch.empty_like(q)
        block_n = triton_attention.decode_block_n(128)
        splits = triton_attention.choose_num_splits(requests, kv_heads, context, dev, block_n)
        work = triton_attention.decode_workspace(requests, heads, splits, 128, dev)
        row = {"case": name, "splits": splits}
        for label, dtype, f16, fma in (
            ("bf16", torch.bfloat16, None, False),
            ("fp8_f16_dots", torch.float8_e4m3fn, True, False),
            ("fp8_bf16_dots", torch.float8_e4m3fn, False, False),
            ("fp8_fma", torch.float8_e4m3fn, None, True),
            ("bf16_fma", torch.bfloat16, None, True),
        ):
            caches = []
            for _ in range(2):  # K, V
                c = torch.randn(num_pages, 16, kv_heads, 128, device=dev).to(dtype)
                caches.append(c)
            k_cache, v_cache = caches
            args = (q, k_cache, v_cache, table, seq_lens, 0.088, out, splits, work)
            us = graph_us([lambda a=args, f=f16, m=fma: decode(*a, f16=f, fma=m)] * 20)
            kv_bytes = 2 * requests * context * kv_heads * 128 * k_cache.element_size()
            row[f"{label}_us"] = us
            row[f"{label}_tb_s"] = kv_bytes / us / 1e6
        rows.append(row)
        print(
            f"{name:36s} bf16 {row['bf16_us']:8.1f} µs ({row['bf16_tb_s']:.2f} TB/s)  "
            f"fp8/f16 {row['fp8_f16_dots_us']:8.1f} ({row['fp8_f16_dots_tb_s']:.2f})  "
            f"fp8/bf16 {row['fp8_bf16_dots_us']:8.1f} ({row['fp8_bf16_dots_tb_s']:.2f})  "
            f"fp8/fma {row['fp8_fma_us']:8.1f} ({row['fp8_fma_tb_s']:.2f})  "
            f"bf16/fma {row['bf16_fma_us']:8.1f}",
            flush=True,
        )
    return {"device": torch.cuda.get_device_name(), "triton": triton.__version__, "cases": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default=None, help="default: triton on CUDA, torch on CPU")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=16,
                   help="teacher-forced chunk; 0: the prompt at once, then one token a step")  # fmt: skip
    p.add_argument("--num-prompts", type=int, default=len(QUESTIONS))
    p.add_argument("--kernels", action="store_true", help="time the decode kernels (CUDA)")
    p.add_argument("--e4m3-dots", action="store_true",
                   help="FP8 decode steps as the e4m3 tensor-core kernel computes them")  # fmt: skip
    p.add_argument("--json", type=Path)
    p.add_argument("--write-scales", type=Path, help="write the calibrated scales (JSON) here")
    args = p.parse_args()
    result = kernels() if args.kernels else accuracy(args)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
