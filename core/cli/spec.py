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
    t.add_argument("--num-samples", type=int, default=512, help="training sequences (512)")
    t.add_argument(
        "--heldout-prompts",
        type=int,
        default=64,
        help="prompts held out of training, answered greedily for heldout_* (64)",
    )
    t.add_argument("--max-new-tokens", type=int, default=256, help="tokens per answer (256)")
    t.add_argument(
        "--temperature",
        default="0.8",
        help="sampling temperature(s) of the training answers, a comma list cycled",
    )
    t.add_argument(
        "--gen-batch",
        type=int,
        default=256,
        help="requests the engine runs at once while generating data (256)",
    )
    t.add_argument(
        "--gen-chunk",
        type=int,
        default=4096,
        help="prompts per generate call (each call is written to disk) (4096)",
    )
    t.add_argument(
        "--data-minutes", type=float, default=3.0, help="start no new generate call after this (3)"
    )
    t.add_argument("--max-len", type=int, default=1024, help="tokens per training sequence")
    t.add_argument(
        "--prefill-tokens",
        type=int,
        default=65536,
        help="tokens per feature-capture prefill batch (65536)",
    )
    t.add_argument("--steps", type=int, default=2000, help="optimizer steps in all (2000)")
    t.add_argument(
        "--train-minutes",
        type=float,
        default=0.0,
        help="training minutes of the whole plan, across calls: ends the schedule",
    )
    t.add_argument("--batch-size", type=int, default=8, help="sequences per step (8)")
    t.add_argument("--ttt-steps", type=int, default=7, help="training-time test unroll (7)")
    t.add_argument("--lr", type=float, default=3e-4, help="AdamW peak learning rate (3e-4)")
    t.add_argument("--warmup-steps", type=int, default=50, help="linear warm-up (50)")
    t.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine floor (0.1)")
    t.add_argument(
        "--eval-draft-tokens", type=int, default=4, help="chain length of heldout_accept_length (4)"
    )
    t.add_argument("--save-every", type=int, default=100, help="checkpoint every N steps")
    t.add_argument(
        "--max-minutes",
        type=float,
        default=9.0,
        help="this call's budget, data included: stop with a checkpoint after it",
    )
    t.add_argument(
        "--train-lm-head",
        action="store_true",
        help="train the head's LM head too (default: frozen, the target's; the state then "
        "holds it: vocab x hidden float32)",
    )
    t.add_argument(
        "--state-shard-mb",
        type=float,
        default=12.0,
        help="largest state-NN.safetensors shard in MiB (12: a lent machine returns files "
        "of at most 16 MiB)",
    )
    t.add_argument("--dtype", default="auto", help="the target's dtype (the head trains in fp32)")
    t.add_argument("--device", default="auto")
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> int:
    from pegboard.core.speculative.train_eagle3 import train

    return train(args)
