"""SGLang's speculative decoding flags, mapped onto the `speculator` slot and its options.

--speculative-algorithm NGRAM       -> --speculator ngram
--speculative-algorithm STANDALONE  -> --speculator draft (--speculative-draft-model-path)
--speculative-algorithm EAGLE|EAGLE3 -> --speculator eagle (the head's directory in
                                       --speculative-draft-model-path; its config says which)
--speculative-num-steps N           -> N draft tokens per step (a chain of N)
--speculative-num-draft-tokens N    -> N - 1 draft tokens per step (N tokens verified)
--speculative-eagle-topk K          -> K = 1 only (chains; the core does not verify trees yet)
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
        "--speculative-eagle-topk", type=_topk, metavar="K", help="draft branches per step (1)"
    )


def _topk(text: str) -> int:
    if int(text) != 1:
        raise argparse.ArgumentTypeError("only 1 (chains): the core does not verify trees yet")
    return 1


def speculative_settings(args: argparse.Namespace, settings: dict[str, Any]) -> None:
    """Fold the SGLang flags into `settings` (`speculator`, `plugin_options`); ValueError for
    flags that do not fit together (trees already failed at parse time)."""
    algorithm = getattr(args, "speculative_algorithm", None)
    if not algorithm:
        return
    name = ALGORITHMS[algorithm]
    settings["speculator"] = name
    options = settings.setdefault("plugin_options", {}).setdefault(name, {})
    steps = args.speculative_num_steps
    if steps is None and args.speculative_num_draft_tokens is not None:
        steps = args.speculative_num_draft_tokens - 1
    if steps is not None:
        if steps < 1:
            raise ValueError("speculation needs at least one draft token per step")
        options["num_draft_tokens"] = steps
    if args.speculative_draft_model_path:
        if name == "ngram":
            raise ValueError("--speculative-draft-model-path does not go with NGRAM")
        options["model_path"] = args.speculative_draft_model_path
