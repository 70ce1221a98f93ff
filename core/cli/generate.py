"""`pegboard generate "PROMPT"` — one completion from the command line (the bundled model by default)."""

from __future__ import annotations

import argparse
import sys

from pegboard.core.cli.engine_args import (
    add_engine_arguments,
    engine_settings,
    read_chat_template,
    use_chat_template,
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="generate a completion for a prompt",
        description="Generate a completion for each prompt, offline (no server); `--seed` seeds "
        "both the engine and each prompt's sampling.",
    )
    p.add_argument("prompt", nargs="+", help="the prompt (several prompts run as one batch)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument(
        "--top-k", type=int, default=0, help="keep the k likeliest tokens; 0: off (default 0)"
    )
    p.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    add_engine_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pegboard.core.cli.preflight import check_before_loading
    from pegboard.core.config import EngineConfig
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    try:
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            seed=args.seed,
        )
        template = read_chat_template(args)
    except ValueError as e:
        print(f"pegboard generate: {e}", file=sys.stderr)
        return 2
    settings = engine_settings(args)
    check_before_loading(EngineConfig(**settings))
    llm = LLM(**settings)
    use_chat_template(llm.tokenizer, template)
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
