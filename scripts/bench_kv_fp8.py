"""Accuracy of the FP8 KV cache against the model-dtype KV cache on the bundled SmolLM2.

Over a fixed prompt set (chat-formatted questions):
- greedy agreement: each prompt is generated greedily (`--max-tokens`) with `--kv-cache-dtype
  auto` and with `fp8_e4m3`; reported: the share of identical completions and the mean share
  of identical leading tokens;
- mean KL: the auto-KV completion is fed back teacher-forced through both KV caches (prompt +
  completion in chunks of `--chunk` tokens, so later chunks attend over cached FP8 keys and
  values); reported: the mean KL(p_auto || p_fp8) of the next-token distributions over the
  completion's positions, and their top-1 agreement.

    python3 scripts/bench_kv_fp8.py [--device cuda] [--attention triton] [--json FILE]

On CUDA the model runs in bf16 with the Triton attention backend; on CPU (a smoke run) in
float32 with the torch backend.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from pegboard.core.default_model import default_model_dir
from pegboard.core.llm import LLM
from pegboard.core.model_runner import ModelRunner
from pegboard.sdk.types import KVPool, Request, SamplingParams, kv_dtype

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


def teacher_forced_logits(runner: ModelRunner, backend_cls, pool: KVPool, seq: list[int],
                          chunk: int) -> torch.Tensor:  # fmt: skip
    """Logits `[len(seq), vocab]`, fed in chunks so later tokens attend over the cache."""
    backend = backend_cls(runner.info, pool)
    runner.set_attention(backend)
    request = Request(prompt_token_ids=seq)
    request.page_table = list(range(-(-len(seq) // pool.page_size)))
    out = []
    while request.num_computed_tokens < len(seq):
        n = min(chunk, len(seq) - request.num_computed_tokens)
        batch = runner.prepare([request], [n], pool.page_size)
        start = request.num_computed_tokens
        batch.logits_indices = torch.arange(n, device=runner.device)
        batch.samples = [True]
        out.append(runner.forward(batch).float().cpu())
        request.num_computed_tokens = start + n
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--attention", default=None, help="default: triton on CUDA, torch on CPU")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--chunk", type=int, default=16)
    p.add_argument("--num-prompts", type=int, default=len(QUESTIONS))
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    cuda = args.device.startswith("cuda")
    attention = args.attention or ("triton" if cuda else "torch")
    dtype = "bfloat16" if cuda else "float32"
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS[: args.num_prompts]]

    completions = {}
    for name in ("auto", "fp8_e4m3"):
        with LLM(None, dtype=dtype, device=args.device, attention=attention,
                 kv_cache_dtype=name) as llm:  # fmt: skip
            prompts = [llm.tokenizer.apply_chat_template(c) for c in chats]
            completions[name] = [o.token_ids for o in llm.generate(prompts, params)]
    same = [a == b for a, b in zip(completions["auto"], completions["fp8_e4m3"])]
    prefix = []
    for a, b in zip(completions["auto"], completions["fp8_e4m3"]):
        n = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        prefix.append(n / max(len(a), 1))

    if attention == "triton":
        from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend as Backend
    else:
        from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend as Backend
    runner = ModelRunner(default_model_dir(), dtype, args.device, progress=False)
    kls, top1 = [], []
    for prompt, completion in zip(prompts, completions["auto"]):
        seq = prompt + completion
        logits = {}
        for name in ("auto", "fp8_e4m3"):
            pages = -(-len(seq) // 16) + 1
            pool = KVPool.allocate(runner.info, pages, 16, dtype=kv_dtype(name, runner.info.dtype))
            logits[name] = teacher_forced_logits(runner, Backend, pool, seq, args.chunk)
        rows = slice(len(prompt) - 1, len(seq) - 1)  # predicting the completion's tokens
        ref = torch.log_softmax(logits["auto"][rows], -1)
        got = torch.log_softmax(logits["fp8_e4m3"][rows], -1)
        kls.append(float((ref.exp() * (ref - got)).sum(-1).mean()))
        top1.append(float((ref.argmax(-1) == got.argmax(-1)).float().mean()))

    result = {
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "attention": attention,
        "dtype": dtype,
        "prompts": len(chats),
        "max_tokens": args.max_tokens,
        "greedy_identical_completions": sum(same) / len(same),
        "greedy_mean_identical_prefix": sum(prefix) / len(prefix),
        "teacher_forced_mean_kl": sum(kls) / len(kls),
        "teacher_forced_top1_agreement": sum(top1) / len(top1),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
