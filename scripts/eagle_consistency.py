"""Does serving draft what `pegboard spec train-eagle3` taught? For an EAGLE-3 head, compare
every chain the `eagle` speculator proposes while generating (greedy, chat prompts, the switch
off so every step drafts) with the trainer's own forward on the same context
(`train_eagle3.trainer_drafts`: the target's hidden states through a dense causal forward, the
head in float32 from its files, as training ran it), and with the target's actual next tokens.

    python3 scripts/eagle_consistency.py --model DIR --head HEAD [--dtype bfloat16] \
        [--disable-cuda-graph] [--eagle-attention torch] [--max-tokens 128]

Prints JSON: `proposals`; `served_first_is_trainers` / `served_chain_is_trainers` (the share of
proposals whose first draft / whole chain equals the trainer's: 1.0 up to near-ties, or serving
and training disagree about the head's inputs); `trainer_first_is_target` (the trainer's first
draft equals the target's greedy next token: the acceptance the training metric promises on
this text) and `served_first_is_target` (what serving gets); the engine's `accept_rate`.
Run it in bfloat16 with graphs (as served), without graphs, and in float32 to locate a gap.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from bench_speculative import QUESTIONS  # noqa: E402


def main() -> None:
    from pegboard.core.default_model import default_model_dir
    from pegboard.core.llm import LLM
    from pegboard.core.speculative.hidden import TargetHidden
    from pegboard.core.speculative.train_eagle3 import trainer_drafts
    from pegboard.plugins.speculative.eagle import EagleHead, aux_layers, read_head_config
    from pegboard.sdk.types import SamplingParams

    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument("--head", required=True, help="the EAGLE-3 head's directory")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--num-draft-tokens", type=int, default=4)
    p.add_argument("--eagle-attention", default="auto", help="the head's backend when serving")
    p.add_argument("--disable-cuda-graph", action="store_true")
    args = p.parse_args()
    model = args.model or str(default_model_dir())
    options = {"model_path": args.head, "num_draft_tokens": args.num_draft_tokens,
               "attention": args.eagle_attention}  # fmt: skip
    records = []
    with LLM(model, dtype=args.dtype, device=args.device, speculator="eagle",
             plugin_options={"eagle": options}, speculative_min_accept_rate=0.0,
             speculative_min_speedup=0.0,  # every step drafts: the switch off
             disable_cuda_graph=args.disable_cuda_graph) as llm:  # fmt: skip
        spec = llm.engine.plugins.active("speculator")
        original = spec.propose

        def propose(requests, max_tokens):
            out = original(requests, max_tokens)
            records.extend(
                (list(r.token_ids), d.host_tokens()) for r, d in zip(requests, out) if d.tokens
            )
            return out

        spec.propose = propose
        llm.engine.plugins.unregister(spec)
        llm.engine.plugins.register(spec)
        prompts = [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}])
                   for q in QUESTIONS]  # fmt: skip
        params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0)
        outs = [llm.generate([q], params)[0] for q in prompts]  # batch 1, as bench_speculative
        stats = llm.engine.speculation.stats()
        graphs = llm.engine.runner.cuda_graphs is not None
        target = llm.engine.runner.model
        config = read_head_config(args.head)
        head = EagleHead(config, True, target, args.head).to(target.lm_head.weight.device).float()
        hooks = TargetHidden(target, aux_layers(config, len(target.model.layers)))
        full = [list(q) + list(o.token_ids) for q, o in zip(prompts, outs)]
        same_first = same_chain = trainer_hit = served_hit = 0
        try:
            for context, drafts in records:
                ours = trainer_drafts(head, target, hooks, context, drafts)
                seq = next((f for f in full if f[: len(context)] == context), None)
                nxt = seq[len(context)] if seq is not None and len(seq) > len(context) else None
                same_first += ours[0] == drafts[0]
                same_chain += ours == drafts
                trainer_hit += ours[0] == nxt
                served_hit += drafts[0] == nxt
        finally:
            hooks.remove()
    n = max(len(records), 1)
    print(json.dumps({
        "model": model, "head": args.head, "dtype": str(target.lm_head.weight.dtype),
        "cuda_graphs": graphs, "eagle_attention": args.eagle_attention,
        "proposals": len(records),
        "served_first_is_trainers": round(same_first / n, 3),
        "served_chain_is_trainers": round(same_chain / n, 3),
        "trainer_first_is_target": round(trainer_hit / n, 3),
        "served_first_is_target": round(served_hit / n, 3),
        "accept_rate": stats["spec_accept_rate"],
        "accept_length": stats["spec_accept_length"],
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    with torch.inference_mode(False):
        main()
