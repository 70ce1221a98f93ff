"""`pegboard generate "PROMPT"` — one completion from the command line (the bundled model by default)."""

from __future__ import annotations

import argparse
import sys

from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate a completion for a prompt")
    p.add_argument("prompt", nargs="+", help="the prompt (several prompts run as one batch)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None, dest="sample_seed")
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.sample_seed,
        )
    except ValueError as e:
        print(f"pegboard generate: {e}", file=sys.stderr)
        return 2
    llm = LLM(**engine_settings(args))
    try:
        if args.chat:
            outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
        else:
            outs = llm.generate(args.prompt, params)
    finally:
        llm.close()
    for prompt, out in zip(args.prompt, outs):
        print(out.text if args.chat else prompt + out.text)
    return 0
