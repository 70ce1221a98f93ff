"""Expert parallelism over four CPU ranks (gloo): a Qwen3-MoE whose heads, KV heads, dense and
expert intermediate sizes and experts all divide by 4 gives the one-process greedy tokens with
the static placement (2 experts a rank) and with EPLB over 8 + 4 slots (3 a rank) while a
forced placement and frequent rebalances move experts between the four ranks."""

from __future__ import annotations

import pytest
import torch
from fixtures.tiny_moe import build_tiny_moe
from pegboard.core.llm import LLM
from pegboard.core.models.moe import moe_blocks
from pegboard.sdk.expert_placement import ExpertPlacement
from test_engine_parity import make_prompts
from test_moe_ep import run, transfers

SETTINGS = dict(dtype="float32", device="cpu", page_size=4, kv_cache_tokens=128)


@pytest.mark.slow
def test_ep4_static_and_eplb_moves_between_four_ranks_equal_one_process(tmp_path):
    model_dir = build_tiny_moe(
        tmp_path / "qwen3_moe", "qwen3_moe", num_key_value_heads=4, num_hidden_layers=2
    )
    prompts = make_prompts(512)[:3]
    with LLM(str(model_dir), **SETTINGS) as llm:
        one = [r.output_token_ids for r in run(llm, prompts)]

    with LLM(str(model_dir), ep_size=4, **SETTINGS) as llm:
        experts = moe_blocks(llm.engine.runner.model)[0].experts
        assert experts.w13.shape[0] == 2, "rank 0 does not hold a quarter of the 8 experts"
        static = [r.output_token_ids for r in run(llm, prompts)]
    assert static == one

    settings = dict(SETTINGS, expert_placement="eplb", eplb_rebalance_num_iterations=2)
    with LLM(str(model_dir), ep_size=4, ep_num_redundant_experts=4, **settings) as llm:
        runtime = llm.engine.moe
        # as loaded: slots 0-11 hold experts 0-7, 0-3; rolled by one rank's 3 slots, every
        # rank's experts come from the rank before it
        rolled = (torch.arange(12) % 8).roll(3)
        forced = ExpertPlacement(rolled.repeat(runtime.topology.num_layers, 1), 8)

        after_force = []

        def force(step: int) -> None:
            if step == 1:
                runtime._apply(forced, "test")
                after_force.append(transfers(llm))

        requests = run(llm, prompts, force)
        assert after_force[0] > 0, "the forced placement moved nothing between the ranks"
        assert transfers(llm) > after_force[0], "EPLB moved no expert between the ranks"
        assert runtime.rebalances >= 3, "EPLB never placed the experts again"
        slots = runtime.recorder.slot_load()
        ranks = slots.view(slots.shape[0], 4, 3).sum(dim=2)
        assert bool((ranks > 0).all()), f"a rank computed no tokens: {ranks}"
    assert [r.output_token_ids for r in requests] == one
