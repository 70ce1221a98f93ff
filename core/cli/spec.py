"""`pegboard spec train-eagle3`: speculative decoding tools (see `core/speculative`)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("spec", help="speculative decoding tools (train an EAGLE-3 head)")
    tools = p.add_subparsers(dest="spec_command", metavar="TOOL", required=True)
    t = tools.add_parser(
        "train-eagle3",
        help="train an EAGLE-3 head for a model by self-distillation",
        description="The target writes its own training text, then an EAGLE-3 head is trained "
        "on its hidden states with training-time test; checkpoints let a run stop "
        "(--max-minutes) and resume. OUT holds the head in SGLang's format.",
    )
    t.add_argument("--model", required=True, help="the target model's HF directory")
    t.add_argument("--out", required=True, help="directory for data, checkpoints and the head")
    t.add_argument("--prompts", help="a text file of prompts, one per line (default: built in)")
    t.add_argument("--num-samples", type=int, default=512, help="sequences generated (512)")
    t.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (256)")
    t.add_argument("--max-len", type=int, default=1024, help="tokens per training sequence")
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (2000)")
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (8)")
    t.add_argument("--ttt-steps", type=int, default=7, help="training-time test unroll (7)")
    t.add_argument("--lr", type=float, default=3e-4, help="AdamW learning rate (3e-4)")
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    t.add_argument("--max-minutes", type=float, default=9.0, help="stop (and save) after this")
    t.add_argument("--dtype", default="auto", help="the target's dtype (the head trains in fp32)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pegboard.core.speculative.train_eagle3 import train

    return train(args)
