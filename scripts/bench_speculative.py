"""Decode speed with and without speculative decoding on real chat prompts.

Runs the same prompts (chat-formatted, greedy, `--max-tokens` each) through one engine without
speculation and one with it, `--batch-size` prompts at a time (1: batch-1 decode), and prints
JSON: output tokens per second of each, the speed-up, the acceptance rate and length, and the
share of completions identical to the plain run (bf16 near-ties may differ).

    python3 scripts/bench_speculative.py --speculative-algorithm EAGLE3 \
        --speculative-draft-model-path /tmp/eagle3-smollm2 [--model DIR] [--batch-size 1]
    python3 scripts/bench_speculative.py --speculative-algorithm NGRAM --extractive
    python3 scripts/bench_speculative.py --speculative-algorithm STANDALONE \
        --speculative-draft-model-path DIR --model DIR      # the target as its own draft

`--extractive` asks the model to repeat and edit a given text (n-gram lookup's workload).
"""

from __future__ import annotations

import argparse
import json
import time

from pegboard.core.default_model import default_model_dir
from pegboard.core.llm import LLM
from pegboard.core.speculative.flags import add_speculative_arguments, speculative_settings
from pegboard.sdk.types import SamplingParams

QUESTIONS = [
    "Explain how a refrigerator works.",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Describe the water cycle step by step.",
    "Write a Python function that reverses a linked list, with comments.",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
]
PASSAGE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! The five boxing wizards jump quickly. "
)


def run(llm, prompts, params, batch_size):
    start = time.perf_counter()
    outs = []
    for i in range(0, len(prompts), batch_size):
        outs += llm.generate(prompts[i : i + batch_size], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return outs, tokens / elapsed


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="prompt list repetitions")
    p.add_argument("--extractive", action="store_true")
    p.add_argument("--device", default="auto")
    add_speculative_arguments(p)
    args = p.parse_args()
    model = args.model or str(default_model_dir())
    settings = {}
    speculative_settings(args, settings)
    questions = QUESTIONS * args.repeat
    if args.extractive:
        questions = [f"Repeat this text exactly, then once more with every 'quick' replaced by "
                     f"'fast':\n\n{PASSAGE * 3}" for _ in questions]  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=False)
    result = {"model": model, "batch_size": args.batch_size, "prompts": len(questions)}
    with LLM(model, device=args.device) as llm:
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}])
                   for q in questions]  # fmt: skip
        run(llm, prompts[:1], params, 1)  # warm-up
        plain, result["plain_tok_s"] = run(llm, prompts, params, args.batch_size)
    with LLM(model, device=args.device, **settings) as llm:
        run(llm, prompts[:1], params, 1)
        before = llm.engine.speculation.stats()
        spec, result["spec_tok_s"] = run(llm, prompts, params, args.batch_size)
        result["speculation"] = llm.engine.speculation.report(before)
    result["speedup"] = round(result["spec_tok_s"] / result["plain_tok_s"], 3)
    same = [a.token_ids == b.token_ids for a, b in zip(plain, spec)]
    result["identical_completions"] = f"{sum(same)}/{len(same)}"
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
