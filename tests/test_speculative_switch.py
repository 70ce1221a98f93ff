"""The engine-wide speculation switch (core/speculative/switch.py): steps run without drafts
when the batch is large or too few drafts are accepted, and drafting comes back when a probe
finds it helps again; outputs never change."""

from __future__ import annotations

import pytest
import test_speculative
from pegboard.core.speculative import switch as S
from pegboard.core.speculative.switch import SpeculationSwitch
from test_speculative import MAX_NEW, OracleSpeculator, assert_same, generate, oracle_plugins

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs


def test_low_acceptance_turns_drafting_off_then_probes_with_a_growing_cooldown():
    sw = SpeculationSwitch(None, min_accept_rate=0.2)
    for _ in range(S.MIN_SAMPLES):
        assert sw.allows(1)
        sw.record(drafted=8, accepted=0)
    assert not sw.on and sw.num_turned_off == 1
    off = 0
    while not sw.allows(1):
        off += 1
    assert off == S.COOLDOWN  # then a probe: drafting again
    for _ in range(S.MIN_SAMPLES):
        sw.record(drafted=8, accepted=1)  # 1/8 < 0.2: still low
    off = 0
    while not sw.allows(1):
        off += 1
    assert off == 2 * S.COOLDOWN
    for _ in range(S.MIN_SAMPLES):
        sw.record(drafted=8, accepted=6)  # it helps again: stays on, cooldown reset
    assert sw.on and all(sw.allows(1) for _ in range(100))
    assert sw._cooldown == S.COOLDOWN


def test_the_cooldown_stops_growing_at_its_maximum():
    sw = SpeculationSwitch(None, min_accept_rate=0.5)
    offs = []
    for _ in range(8):
        for _ in range(S.MIN_SAMPLES):
            sw.record(drafted=4, accepted=0)
        off = 0
        while not sw.allows(1):
            off += 1
        offs.append(off)
    assert offs[:5] == [16, 32, 64, 128, 256] and max(offs) == S.MAX_COOLDOWN


def test_large_batches_run_without_drafts():
    sw = SpeculationSwitch(disable_batch_size=32, min_accept_rate=0.0)
    assert sw.allows(31) and not sw.allows(32) and not sw.allows(64)
    sw.record(drafted=10, accepted=0)  # rate 0 is off: acceptance never turns it off
    assert all(sw.allows(1) for _ in range(10))


def test_a_speculator_that_always_misses_is_turned_off_and_outputs_are_unchanged(case):
    """Every draft is wrong. With the switch off (rate 0) only the per-request back-off saves
    verify steps; with it on, drafting stops for the whole batch after a few misses."""
    model_dir, prompts, reference = case
    references = {tuple(p): ref for p, ref in zip(prompts, reference)}
    params = dict(speculator="oracle", max_num_batched_tokens=64)

    outs, without = generate(
        model_dir, prompts, oracle_plugins(references, 1), speculative_min_accept_rate=0.0,
        **params,
    )  # fmt: skip
    assert_same(outs, reference)
    calls_without = OracleSpeculator.calls

    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    pm = oracle_plugins(references, 1)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, metrics=["prometheus"],
             **params) as llm:  # fmt: skip
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        switch = llm.engine.speculation.switch
        stats = llm.engine.speculation.stats()
        text = pm.active_all("metrics")[0].render().decode()
    assert_same(outs, reference)
    assert switch.num_turned_off >= 1 and switch.num_off_steps >= S.COOLDOWN - 1
    labels = f'model_name="{model_dir}"'  # the switch's decisions, in /metrics
    assert f"pegboard:spec_switch_turned_off_total{{{labels}}} {switch.num_turned_off}.0" in text
    off = f'pegboard:spec_switch_off_steps_total{{{labels},reason="accept_rate"}}'
    assert f"{off} {switch.num_off_steps}.0" in text
    assert stats["spec_accepted_tokens"] == 0
    assert stats["spec_verify_steps"] < without["spec_verify_steps"]
    assert OracleSpeculator.calls < calls_without


def test_drafting_comes_back_when_the_drafts_turn_good(case):
    """Wrong drafts for the first outputs, right ones after: the switch turns off, probes
    after its cooldown, finds the drafts accepted and stays on."""
    model_dir, prompts, reference = case
    prompts, reference = prompts[:2], reference[:2]
    long_new = 3 * MAX_NEW
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams
    from test_engine_parity import hf_reference

    reference = [t for t, _ in hf_reference(model_dir, prompts, long_new)]

    class LateOracle(OracleSpeculator):
        name = "late_oracle"

        def propose(self, requests, max_tokens):
            out = super().propose(requests, max_tokens)
            for r, d in zip(requests, out):
                if r.num_output_tokens < 8:
                    d.tokens = [(t + 1) % 512 for t in d.tokens]
            return out

    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, 0)
    pm.add(LateOracle)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm,
             speculator="late_oracle") as llm:  # fmt: skip
        outs = llm.generate(prompts, SamplingParams(max_tokens=long_new, temperature=0.0))
        switch = llm.engine.speculation.switch
        stats = llm.engine.speculation.stats()
    assert_same(outs, reference)
    assert switch.num_turned_off == 1 and switch.on
    assert stats["spec_accepted_tokens"] > long_new  # accepted again after the probe


@pytest.mark.parametrize("limit, drafted", [(6, False), (7, True)])
def test_disable_by_batch_size(case, limit, drafted):
    model_dir, prompts, reference = case
    assert len(prompts) == 6
    outs, stats = generate(
        model_dir, prompts, speculator="ngram", speculative_disable_by_batch_size=limit
    )
    assert_same(outs, reference)
    assert (stats["spec_draft_tokens"] > 0) == drafted


def test_a_reset_turns_drafting_back_on_with_a_fresh_cooldown():
    sw = SpeculationSwitch(None, min_accept_rate=0.2)
    for _ in range(2 * S.MIN_SAMPLES):
        sw.record(drafted=8, accepted=0)
    assert not sw.on
    sw.reset()  # a swap to another speculator
    assert sw.on and sw.allows(1) and sw._cooldown == S.COOLDOWN


def test_steps_the_switch_keeps_plain_overlap_and_steps_that_may_draft_do_not(case):
    """Overlap scheduling stays on under speculation where it can: while the switch keeps
    drafting off, a step's tokens stay on the device into the next step; a step after which
    drafting may resume reads them at once (a request drafts after its last token)."""
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import Request, SamplingParams

    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, 1)  # all wrong
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    seen = []  # after each step: (drafting may resume, a step is still pending)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm,
             speculator="oracle") as llm:  # fmt: skip
        engine = llm.engine
        requests = [Request(p, params) for p in prompts]
        for r in requests:
            engine.add_request(r)
        while engine.has_work():
            engine.step()
            seen.append((engine.speculation.needs_tokens(), engine._pending is not None))
        assert engine.speculation.switch.num_off_steps > 0
    assert [r.output_token_ids for r in requests] == reference
    assert any(pending for _, pending in seen)  # overlapped while switched off
    assert not any(pending for may_draft, pending in seen if may_draft)
