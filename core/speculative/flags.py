"""SGLang's speculative decoding flags, mapped onto the `speculator` slot and its options.

--speculative-algorithm NGRAM       -> --speculator ngram
--speculative-algorithm STANDALONE  -> --speculator draft (--speculative-draft-model-path)
--speculative-algorithm EAGLE|EAGLE3 -> --speculator eagle (the head's directory in
                                       --speculative-draft-model-path; its config says which)
--speculative-num-steps N           -> N draft tokens per step (a chain of N); with
                                       --speculative-eagle-topk > 1: the tree's depth
--speculative-num-draft-tokens N    -> N - 1 draft tokens per step (N tokens verified)
--speculative-eagle-topk K          -> K > 1: draft trees (EAGLE, STANDALONE: top-K per
                                       expanded node, K nodes expanded per depth; NGRAM: K
                                       continuations)
--speculative-disable-by-batch-size N, --speculative-min-accept-rate R,
--speculative-min-speedup S         -> steps without drafts (core/speculative/switch.py)
"""

from __future__ import annotations

import argparse
from typing import Any

ALGORITHMS = {"NGRAM": "ngram", "STANDALONE": "draft", "EAGLE": "eagle", "EAGLE3": "eagle"}


def add_speculative_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding (SGLang's flags; or --speculator NAME)")
    g.add_argument(
        "--speculative-algorithm",
        type=str.upper,
        choices=list(ALGORITHMS),
        help="NGRAM (prompt lookup), STANDALONE (a draft model), EAGLE / EAGLE3 (a head)",
    )
    g.add_argument(
        "--speculative-draft-model-path", metavar="DIR", help="the draft model or EAGLE head"
    )
    g.add_argument("--speculative-num-steps", type=int, metavar="N", help="draft tokens per step")
    g.add_argument(
        "--speculative-num-draft-tokens",
        type=int,
        metavar="N",
        help="tokens verified per step, the request's last one included (N - 1 drafts)",
    )
    g.add_argument(
        "--speculative-eagle-topk",
        type=_positive,
        metavar="K",
        help="branches per draft-tree node (1: chains)",
    )
    g.add_argument(
        "--speculative-disable-by-batch-size",
        type=_positive,
        metavar="N",
        help="steps with N or more requests run without drafts (default: no limit)",
    )
    g.add_argument(
        "--speculative-min-accept-rate",
        type=float,
        metavar="R",
        help="turn drafting off while fewer than this share of drafts is accepted, probing "
        "again later (default 0.2; 0 keeps it on)",
    )
    g.add_argument(
        "--speculative-min-speedup",
        type=float,
        metavar="S",
        help="time decode steps with and without drafts and turn drafting off while it yields "
        "fewer than S times plain decoding's tokens per second, probing again later (default: "
        "1.0 on CUDA, off elsewhere; 0: off)",
    )


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def speculative_settings(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Fold the SGLang flags into `settings` (`speculator`, `plugin_options`); ValueError for
    flags that do not fit together."""
    algorithm = getattr(args, "speculative_algorithm", None)
    if not algorithm:
        return
    name = ALGORITHMS[algorithm]
    settings["speculator"] = name
    if getattr(args, "speculative_min_speedup", None) is not None:
        settings["speculative_min_speedup"] = args.speculative_min_speedup
    options = settings.setdefault("plugin_options", {}).setdefault(name, {})
    topk = args.speculative_eagle_topk or 1
    steps = args.speculative_num_steps
    if topk > 1:
        options["topk"] = topk
        if steps is not None:
            options["num_steps"] = steps
        if args.speculative_num_draft_tokens is not None:
            steps = args.speculative_num_draft_tokens - 1
        elif steps is not None:
            steps *= topk
    elif steps is None and args.speculative_num_draft_tokens is not None:
        steps = args.speculative_num_draft_tokens - 1
    if steps is not None:
        if steps < 1:
            raise ValueError("speculation needs at least one draft token per step")
        options["num_draft_tokens"] = steps
    if args.speculative_draft_model_path:
        if name == "ngram":
            raise ValueError("--speculative-draft-model-path does not go with NGRAM")
        options["model_path"] = args.speculative_draft_model_path
