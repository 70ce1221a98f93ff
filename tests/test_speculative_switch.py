"""The engine-wide speculation switch (core/speculative/switch.py): steps run without drafts
when the batch is large or too few drafts are accepted, and drafting comes back when a probe
finds it helps again; outputs never change."""

from __future__ import annotations

import types

import pytest
import test_speculative
from pegboard.core.speculative import switch as S
from pegboard.core.speculative.switch import SpeculationSwitch
from pegboard.sdk.types import Drafts
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
    from test_speculative import oracle_requests

    reference = case[2]
    seen = []  # after each step: (drafting may resume, a step is still pending)
    with oracle_requests(case, 1) as (engine, requests):  # every draft wrong
        while engine.has_work():
            engine.step()
            seen.append((engine.speculation.needs_tokens(), engine._pending is not None))
        assert engine.speculation.switch.num_off_steps > 0
    assert [r.output_token_ids for r in requests] == reference
    assert any(pending for _, pending in seen)  # overlapped while switched off
    assert not any(pending for may_draft, pending in seen if may_draft)


# ---------------------------------------------------------------- the speed rule


@pytest.fixture
def doubling_cooldowns(monkeypatch):
    """The cooldowns as the doubling alone sets them: a probe may lose as much as its whole
    cooldown (`PROBE_SHARE` 1), so the probe-cost bound never lengthens one here (it is
    tested on its own below)."""
    monkeypatch.setattr(S, "PROBE_SHARE", 1.0)


def _run_steps(sw, steps, verify_seconds, verify_tokens, plain_seconds=None, requests=None):
    """Drive `sw` as the engine does for one decoding request (or `requests`), on a stand-in
    clock: a plain step yields a token per request in `plain_seconds(first, last)` (1 s: in a
    run of plain steps; the first of a run and the last, which reads its tokens at once, may
    differ), a step with drafts `verify_tokens` in `verify_seconds` (a number, or a function
    of the step's index and whether it is the first of a run with drafts). Returns whether
    each step drafted."""
    now, drafted = 0.0, []
    requests = requests or [object()]
    n = len(requests)
    cost = verify_seconds if callable(verify_seconds) else lambda i, first: verify_seconds
    for i in range(steps):
        on = sw.begin_step(requests, [1] * n, now)
        if on:
            accepted = verify_tokens - n  # (a batch: its drafting requests' drafts all right)
            sw.record(drafted=4 if n == 1 else accepted, accepted=accepted, requests=n)
            sw.tokens(verify_tokens)
            now += cost(i, not drafted or not drafted[-1])
        else:
            first = not drafted or drafted[-1]
            last = sw.may_allow(n)  # the next step may draft: this one reads its tokens now
            now += plain_seconds(first, last) if plain_seconds else 1.0
        drafted.append(on)
    return drafted


def _runs(drafted: list[bool]) -> list[int]:
    """The lengths of the runs of steps with drafts."""
    runs, n = [], 0
    for on in drafted + [False]:
        if on:
            n += 1
        elif n:
            runs.append(n)
            n = 0
    return runs


@pytest.mark.parametrize("verify_seconds, probe_len", [(2.6, 1), (2.1, 2)])
def test_speed_rule_turns_off_drafts_that_are_accepted_but_slower_than_plain_decoding(
    verify_seconds, probe_len, doubling_cooldowns
):
    """2 tokens per verify step at 2.6x a plain step's time (Qwen3's n-gram chain on the
    H200, session 7): accepted drafts, but 0.77x plain speed; the rule turns drafting off, and
    every later probe costs one verify step (a loss this clear needs no second one); at 0.95x
    (2.1 s) a probe takes two."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    drafted = _run_steps(sw, 200, verify_seconds=verify_seconds, verify_tokens=2)
    probe = S.PROBE_STEPS + 2
    assert drafted[: probe + 1] == [False] * probe + [True]  # plain decoding measured first
    assert sw.num_turned_off >= 3 and sw.off_steps["speed"] >= probe + S.COOLDOWN
    assert sw.off_steps["accept_rate"] == 0  # a quarter of the drafts accepted: not that rule
    # cooldowns of 16, 32, 64, ... between probes
    # (+ each run's first step, not counted; the first verdict at 0.77x needs two steps: it is
    # not below 0.75x)
    runs = _runs(drafted)
    assert runs[0] == 3 and runs[1:] == [1 + probe_len] * (len(runs) - 1) and len(runs) >= 4
    assert sum(drafted) <= 3 + 4 * (1 + probe_len)
    speeds = sw.speeds
    assert speeds["spec_tokens_per_s"] < speeds["plain_tokens_per_s"]
    without = SpeculationSwitch(None, min_accept_rate=0.2)  # the rule off: always drafting
    assert all(_run_steps(without, 200, verify_seconds=2.6, verify_tokens=2))


def test_speed_rule_keeps_drafting_that_wins_and_probes_ever_less_often():
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    probe = S.PROBE_STEPS + 2
    drafted = _run_steps(sw, 3 * S.PROBE_EVERY + 2 * probe, verify_seconds=1.9, verify_tokens=5)
    assert sw.num_turned_off == 0
    assert sw.off_steps["speed"] == 2 * probe  # first, then after 64 steps with drafts
    assert _runs(drafted) == [S.PROBE_EVERY, 2 * S.PROBE_EVERY]  # then after 128
    assert sw.probe_every == 2 * S.PROBE_EVERY


def test_speed_rule_judges_a_batch_against_plain_batches_of_its_size(doubling_cooldowns):
    """Speculation that wins at batch 1 (5 tokens per 1.9 s against 1 per second), then a
    batch of 64 whose verify steps yield 75 tokens in 2.17 s against 64 per second plain
    (session 8's n-gram run on the H200: 0.54x). Against the batch-1 figure it would look 34x
    faster: the rule measures plain batches of 64 first and turns drafting off."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    one = _run_steps(sw, 40, verify_seconds=1.9, verify_tokens=5)
    assert sw.num_turned_off == 0 and all(one[S.PROBE_STEPS + 2 :])
    batch = [object() for _ in range(64)]
    big = _run_steps(sw, 50, verify_seconds=2.17, verify_tokens=75, requests=batch)
    assert big[: S.PROBE_STEPS + 3] == [False] * (S.PROBE_STEPS + 2) + [True]
    assert sw.num_turned_off == 2 and sum(big) == 4  # at once, and at its first probe
    assert sw.speeds["plain_tokens_per_s"] == 64.0


def test_speed_rule_leaves_out_the_first_and_last_plain_step_of_a_run(doubling_cooldowns):
    """The first plain step after a verify step has no earlier step to wait for (0.2 s), the
    last reads its tokens at once (3 s: host and device work in a row); in a run each takes
    1 s. Speculation at 5 tokens per 5.5 s (0.91x the 1 token/s of plain decoding) loses and is
    turned off; counting the run's ends would make plain decoding look slower (5 tokens in
    6.2 s) than speculation."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    drafted = _run_steps(
        sw, 60, verify_seconds=5.5, verify_tokens=5,
        plain_seconds=lambda first, last: 3.0 if last else 0.2 if first else 1.0,
    )  # fmt: skip
    assert sw.speeds["plain_tokens_per_s"] == pytest.approx(1.0)
    assert sw.num_turned_off >= 2 and _runs(drafted)[:2] == [3, 3]  # (a first uncounted, 2 judged)


def test_speed_rule_leaves_out_the_first_step_with_drafts_of_a_run():
    """A speculator with its own KV (EAGLE, a draft model) catches up on the tokens decoded
    without it in the first verify step after plain ones: 8 s there, 2.5 s for 5 tokens (2x
    plain speed) after. Counted, that step would make the first verdict (and every probe
    after it) look slower than plain decoding; left out, drafting stays on."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    drafted = _run_steps(sw, 60, lambda i, first: 8.0 if first else 2.5, verify_tokens=5)
    assert sw.num_turned_off == 0 and drafted.count(False) == S.PROBE_STEPS + 2


def test_speed_rule_leaves_out_the_step_after_a_trial():
    """A batch of 64 whose first step with drafts is a trial of `TRIAL_REQUESTS`: the step after
    it is where the other requests' speculator catches up (8 s), as the trial itself did; the
    steps after yield 192 tokens in 1.5 s (2x plain decoding's 64 per second). Counted, the
    step after the trial would turn drafting off at once (24 tokens per second); left out,
    drafting stays on."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    batch = [object() for _ in range(64)]
    now, drafted, after_trial = 0.0, [], False
    for _ in range(40):
        on = sw.begin_step(batch, [1] * 64, now)
        if on:
            asking = sum(map(bool, sw.trial([4] * 64)))
            sw.record(drafted=4 * asking, accepted=2 * asking, requests=asking)
            sw.tokens(64 + 2 * asking)
            first = not drafted or not drafted[-1]
            now += 8.0 if first or after_trial else 1.5
            after_trial = asking < 64
        else:
            now += 1.0
        drafted.append(on)
    assert sw.num_trials == 1 and sw.num_turned_off == 0
    assert drafted == [False] * (S.PROBE_STEPS + 2) + [True] * (40 - S.PROBE_STEPS - 2)


def test_a_cooldown_times_only_its_last_steps(doubling_cooldowns):
    """Deep in a cooldown a step does none of the speed rule's bookkeeping (a switched-off step
    must cost what a plain step costs: session 12); its last `TIMED_OFF_STEPS` are timed, which
    still fills the plain window before each probe is judged. A batch of 64 whose verify steps
    yield 64 tokens in 2.6 s (every draft wrong): cooldowns of 16 ... 256 steps."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    timed, windows = [], []
    close, judge = sw._close, sw.judge_speed

    def timed_close(*args):
        timed.append(sw._off_for)
        return close(*args)

    def judged(bucket):
        if sw._off_for == 0:
            windows.append(len(sw._speed[bucket][False]))
        return judge(bucket)

    sw._close, sw.judge_speed = timed_close, judged
    batch = [object() for _ in range(64)]
    drafted = _run_steps(sw, 600, verify_seconds=2.6, verify_tokens=64, requests=batch)
    assert sw.off_steps["speed"] > 500 and sw.num_turned_off >= 5
    assert max(timed) == S.TIMED_OFF_STEPS and len(timed) < 600 // 4
    assert windows[2:] == [S.WINDOW] * (len(windows) - 2)  # (the first probe's 3 steps)
    assert _runs(drafted) == [2] * sw.num_turned_off  # probes as before: one uncounted, one judged


def test_speed_rule_hysteresis_keeps_a_near_tie_from_flapping(doubling_cooldowns):
    """Speculation at 1.03x plain speed: drafting that is on stays on; drafting the rule turned
    off (an earlier slow spell, 2.6 s per verify step) comes back only at 1.05x, so it stays
    off at 1.03x through every probe and returns at 1.3x."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    on = _run_steps(sw, S.PROBE_EVERY, verify_seconds=2 / 1.03, verify_tokens=2)
    assert on.count(False) == S.PROBE_STEPS + 2 and sw.num_turned_off == 0  # the first probe
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    near = _run_steps(sw, 200, lambda i, _: 2.6 if i < 10 else 2 / 1.03, verify_tokens=2)
    assert not any(near[-50:])  # still off at the end
    assert sw.num_turned_off >= 3  # each probe at 1.03x turned it off again
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    back = _run_steps(sw, 200, lambda i, _: 2.6 if i < 10 else 2 / 1.3, verify_tokens=2)
    assert sw.num_turned_off == 1 and all(back[-50:])


def test_the_speed_rules_default_is_on_for_cuda_only():
    import torch
    from pegboard.core.speculative.step import min_speedup

    assert min_speedup(None, torch.device("cuda", 0)) == S.DEFAULT_MIN_SPEEDUP == 1.0
    assert min_speedup(None, torch.device("cpu")) is None  # the reference: no clock
    assert min_speedup(0.0, torch.device("cuda")) is None  # 0: off
    assert min_speedup(1.2, torch.device("cpu")) == 1.2
    assert SpeculationSwitch(None, 0.2, 0.0).min_speedup is None


@pytest.mark.parametrize("verify_cost, pays", [(10.0, False), (1.5, True)])
def test_speed_rule_in_the_engine_on_a_stand_in_clock(case, monkeypatch, verify_cost, pays):
    """The engine, with every forward advancing a stand-in clock: a plain step by 1, a verify
    step by `verify_cost`; every third draft is wrong, so a verify step yields 3 tokens. At
    10x the rule turns drafting off; at 1.5x (2x plain speed) it stays on after its first
    probe. Without it (the default on a CPU) drafting never stops (the acceptance rule is off
    here). Greedy outputs equal transformers' in every run."""
    from pegboard.core.llm import LLM
    from pegboard.core.speculative import step as step_module
    from pegboard.sdk.types import SamplingParams
    from test_engine_parity import hf_reference

    model_dir, prompts, _ = case
    prompts, long_new = prompts[:1], 4 * MAX_NEW
    reference = [t for t, _ in hf_reference(model_dir, prompts, long_new)]
    clock = [0.0]
    monkeypatch.setattr(step_module, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    results = {}
    for speedup in (None, 1.0):
        pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, 3)
        with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, speculator="oracle",
                 speculative_min_accept_rate=0.0, speculative_min_speedup=speedup) as llm:  # fmt: skip
            runner, forward = llm.engine.runner, llm.engine.runner.forward

            def timed(batch, forward=forward):
                clock[0] += verify_cost if batch.logits_rows is not None else 1.0
                return forward(batch)

            runner.forward = timed
            outs = llm.generate(prompts, SamplingParams(max_tokens=long_new, temperature=0.0))
            results[speedup] = (llm.engine.speculation.switch, llm.engine.speculation.stats())
        assert_same(outs, reference)
    plain_switch, plain_stats = results[None]
    switch, stats = results[1.0]
    assert plain_switch.num_off_steps == 0 and plain_switch.min_speedup is None
    if pays:
        assert switch.num_turned_off == 0 and switch.off_steps["speed"] == S.PROBE_STEPS + 2
        assert stats["spec_accepted_tokens"] >= plain_stats["spec_accepted_tokens"] - 2 * (
            S.PROBE_STEPS + 2
        )
    else:
        assert switch.num_turned_off >= 1 and switch.off_steps["speed"] >= S.COOLDOWN
        assert stats["spec_verify_steps"] < plain_stats["spec_verify_steps"] / 2


class DecoyTree(OracleSpeculator):
    """Drafts a tree: the reference's next two tokens as its first path and 14 wrong children
    of the request's last token beside it (16 tokens, depth 2; the first path is accepted)."""

    name = "decoy_tree"

    def propose(self, requests, max_tokens):
        out = []
        for r, k in zip(requests, max_tokens):
            done = r.num_output_tokens
            chain = list(self.reference.get(tuple(r.prompt_token_ids), [])[done : done + 2])
            decoys = [(chain[0] + j) % 512 for j in range(1, 15)] if chain else []
            parents = list(range(-1, len(chain) - 1)) + [-1] * len(decoys)
            out.append(Drafts((chain + decoys)[:k], parents=parents[:k]))
        return out


def test_a_tree_accepted_to_its_depth_keeps_drafting(case):
    """The acceptance rule measures a tree against what a chain of its depth could accept: a
    tree of 16 tokens whose 2-token first path is accepted every step is at 100 %, not 2/16
    (below the default 0.2, which switched such trees off)."""
    from pegboard.core.llm import LLM
    from pegboard.core.plugin_manager import PluginManager
    from pegboard.sdk.types import SamplingParams

    model_dir, prompts, reference = case
    DecoyTree.reference = {tuple(p): ref for p, ref in zip(prompts, reference)}
    pm = PluginManager()
    pm.add(DecoyTree)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, attention="torch",
             speculator="decoy_tree") as llm:  # fmt: skip
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        switch, stats = llm.engine.speculation.switch, llm.engine.speculation.stats()
    assert_same(outs, reference)
    assert switch.min_accept_rate == 0.2 and switch.num_turned_off == 0
    assert stats["spec_accept_length"] > 2.5  # two drafts and the target's token, nearly always
    assert stats["spec_accept_rate"] < 0.2  # (of all drafted tokens: the metric counts them)


def test_speed_rule_flag():
    from test_speculative import _parse

    s = _parse("--speculative-algorithm", "NGRAM", "--speculative-min-speedup", "1.05")
    assert s["speculative_min_speedup"] == 1.05
    assert "speculative_min_speedup" not in _parse("--speculative-algorithm", "NGRAM")


# ---------------------------------------------------------------- what a miss costs


def test_one_verify_step_of_a_large_batch_is_enough_to_judge():
    """A verify step of `MIN_VERIFIES` or more drafting requests (64 drafting 4 each) is judged
    at once: all rejected, drafting stops after one verify step, and each probe after a
    cooldown costs one verify step, the cooldowns starting at `LARGE_BATCH_COOLDOWN` (a large
    batch's probe costs more); batch-1 steps, however many drafts (a tree's), still wait
    for `MIN_SAMPLES` steps."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2)
    assert sw.allows(64)
    sw.record(drafted=256, accepted=0, requests=64)
    assert not sw.on and sw.num_turned_off == 1
    assert S.LARGE_BATCH_COOLDOWN > S.COOLDOWN
    for cooldown in (S.LARGE_BATCH_COOLDOWN, 2 * S.LARGE_BATCH_COOLDOWN):
        off = 0
        while not sw.allows(64):
            off += 1
        assert off == cooldown
        sw.record(drafted=4 * S.MIN_VERIFIES, accepted=0, requests=S.MIN_VERIFIES)  # the probe
        assert not sw.on
    small = SpeculationSwitch(None, min_accept_rate=0.2)
    for _ in range(S.MIN_SAMPLES - 1):
        small.record(drafted=64, accepted=0, requests=1)
        assert small.on
    small.record(drafted=64, accepted=0, requests=1)
    assert not small.on


def _trials(
    sw, steps: int, trial_seconds: float, plain_seconds: float = 1.0, churn: bool = False
) -> list[bool]:
    """Drive `sw` through `steps` steps of a batch of 64 on a stand-in clock: a plain step
    takes `plain_seconds`, a step that may draft is a trial whose 16 drafting requests' drafts
    are all rejected and takes `trial_seconds` (64 tokens either way). With `churn`, a request
    of the batch is replaced after every trial (one finished, another joined). Whether each
    step drafted."""
    batch = [object() for _ in range(64)]
    now, drafted = 0.0, []
    for _ in range(steps):
        on = sw.begin_step(batch, [1] * 64, now)
        if on:
            asking = sum(map(bool, sw.trial([4] * 64)))
            sw.record(drafted=4 * asking, accepted=0, requests=asking)
            sw.tokens(64)
            if churn:
                batch = batch[1:] + [object()]
        now += trial_seconds if on else plain_seconds
        drafted.append(on)
    return drafted


def _gaps(drafted: list[bool]) -> list[int]:
    """The steps without drafts between two steps with drafts."""
    at = [i for i, on in enumerate(drafted) if on]
    return [b - a - 1 for a, b in zip(at, at[1:])]


def test_a_costly_probe_is_followed_by_a_cooldown_long_enough_to_pay_for_it():
    """On the speed rule's clock, a trial of a batch of 64 that misses costs 9 plain steps more
    than one (10 s against 1 s: session 20's 11-19 ms trials against a 2.7 ms step, roughly):
    the cooldown after it lasts until that is `PROBE_SHARE` (1 %) of the time, 900 steps, not
    the doubling's 64 and 128, also when the batch after the trial is another (a request
    finished and one joined); a trial that costs little keeps the doubling's cooldowns."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    drafted = _trials(sw, 2000, trial_seconds=10.0)
    loss_steps = (10.0 - 1.0) / 1.0
    assert _gaps(drafted) == [round(loss_steps / S.PROBE_SHARE)] * 2
    assert sw.num_trials == 3 and sw.off_for[1] == "accept_rate"
    churned = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    assert _gaps(_trials(churned, 2000, trial_seconds=10.0, churn=True)) == [900] * 2
    cheap = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    gaps = _gaps(_trials(cheap, 1000, trial_seconds=1.3))  # 0.3 / 0.01 = 30 < 64
    assert gaps[:3] == [S.LARGE_BATCH_COOLDOWN, 2 * S.LARGE_BATCH_COOLDOWN, S.MAX_COOLDOWN]


def test_the_probe_cost_bound_has_a_ceiling_and_needs_the_clock():
    """A probe that costs 1,000 plain steps waits `MAX_PROBE_COOLDOWN` steps, not 100,000;
    without the speed rule's clock (CPU: no `min_speedup`) the cooldowns are the doubling's."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    assert (
        _gaps(_trials(sw, 2 * S.MAX_PROBE_COOLDOWN + 50, trial_seconds=1001.0))
        == [S.MAX_PROBE_COOLDOWN] * 2
    )
    unclocked = SpeculationSwitch(None, min_accept_rate=0.2)
    gaps = _gaps(_trials(unclocked, 600, trial_seconds=1001.0))
    assert gaps[:3] == [S.LARGE_BATCH_COOLDOWN, 2 * S.LARGE_BATCH_COOLDOWN, S.MAX_COOLDOWN]


def test_the_speed_rule_lengthens_its_cooldown_by_the_whole_run_it_judged():
    """Accepted drafts that still lose (2 tokens per 2.6 s against 1 per second at batch 1,
    as the speed-rule test above): the run that turned drafting off had three verify steps
    (the first uncounted by the speed window, but not free), 0.6 s lost each, so the cooldown
    is 1.8 / (0.01 * 1) = 180 steps instead of 16."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2, min_speedup=1.0)
    drafted = _run_steps(sw, 400, verify_seconds=2.6, verify_tokens=2)
    assert _runs(drafted)[0] == 3
    assert _gaps(drafted)[2] == round(3 * 0.6 / S.PROBE_SHARE)
    assert sw.off_steps["speed"] >= 180 + S.PROBE_STEPS + 2


def _trace(engine) -> list[tuple[bool, bool, int]]:
    """Step the engine to the end: per step (it drafted, its tokens stayed on the device into
    the next step, the speculator's calls)."""
    from test_speculative import OracleSpeculator

    spec, seen = engine.speculation, []
    while engine.has_work():
        calls, drafts = OracleSpeculator.calls, spec.num_drafts
        engine.step()
        seen.append(
            (spec.num_drafts > drafts, engine._pending is not None, OracleSpeculator.calls - calls)
        )
    return seen


def test_steps_where_every_request_backs_off_overlap_and_ask_no_drafts(case):
    """Acceptance switch off (rate 0), every draft wrong: the per-request back-off keeps the
    requests from drafting for 2, 4, 8 ... steps. Those steps run like plain decoding: their
    tokens stay on the device into the next step (overlap scheduling), the speculator is not
    asked, and only the step before a request drafts again reads its tokens at once."""
    from test_speculative import oracle_plugins

    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, 1)
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import Request, SamplingParams

    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, speculator="oracle",
             speculative_min_accept_rate=0.0) as llm:  # fmt: skip
        requests = [Request(p, params) for p in prompts]
        for r in requests:
            llm.engine.add_request(r)
        seen = _trace(llm.engine)
    assert [r.output_token_ids for r in requests] == reference
    plain = [(i, pending, calls) for i, (drafted, pending, calls) in enumerate(seen) if not drafted]
    assert sum(pending for _, pending, _ in plain) >= 4  # backed-off steps overlap
    assert all(calls == 0 for _, pending, calls in plain if pending)  # and ask for nothing
    first = next(i for i, pending, _ in plain if pending)
    assert any(drafted for drafted, _, _ in seen[first:])  # the back-off ends: drafting again
    for i, pending, _ in plain[:-1]:  # a plain step that read its tokens at once: a flip
        if not pending:
            assert seen[i + 1][0], f"step {i}: un-overlapped, yet step {i + 1} did not draft"


@pytest.mark.gpu
def test_gpu_engine_has_the_speed_rule_on_by_default(tiny_llama_dir):
    import torch
    from pegboard.core.llm import LLM

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    with LLM(str(tiny_llama_dir), device="cuda", detokenizer="inline", speculator="ngram",
             kv_cache_tokens=4096, disable_cuda_graph=True) as llm:  # fmt: skip
        assert llm.engine.speculation.switch.min_speedup == S.DEFAULT_MIN_SPEEDUP


def test_a_probe_of_a_large_batch_is_a_trial_of_its_next_requests():
    """The first step that may draft, and the first after each cooldown, asks drafts of only
    `TRIAL_REQUESTS` of a larger batch, the next ones each time; a verdict ends the trial (a
    pass: every request drafts again)."""
    sw = SpeculationSwitch(None, min_accept_rate=0.2)
    limits = [4] * 40 + [0] * 8  # the last 8 may not draft this step
    first = sw.trial(limits)
    assert [i for i, k in enumerate(first) if k] == list(range(S.TRIAL_REQUESTS))
    sw.record(drafted=4 * S.TRIAL_REQUESTS, accepted=0, requests=S.TRIAL_REQUESTS)
    assert not sw.on
    while not sw.allows(48):
        pass
    second = sw.trial(limits)  # the probe after the cooldown: the next requests
    assert [i for i, k in enumerate(second) if k] == list(range(16, 32))
    sw.record(drafted=4 * S.TRIAL_REQUESTS, accepted=0, requests=S.TRIAL_REQUESTS)
    while not sw.allows(48):
        pass
    third = sw.trial(limits)  # round the 40 that may draft: 32-39, then 0-7
    assert [i for i, k in enumerate(third) if k] == list(range(8)) + list(range(32, 40))
    sw.record(drafted=4 * S.TRIAL_REQUESTS, accepted=3 * S.TRIAL_REQUESTS, requests=16)
    assert sw.on and sw.trial(limits) == limits and sw.num_trials == 3


def test_a_trial_goes_on_until_it_has_a_verdict_and_small_batches_have_none():
    sw = SpeculationSwitch(None, min_accept_rate=0.2)
    limits = [2] * 20
    assert sum(map(bool, sw.trial(limits))) == S.TRIAL_REQUESTS
    sw.record(drafted=10, accepted=0, requests=5)  # only 5 of them had drafts: no verdict
    assert sw.on and sum(map(bool, sw.trial(limits))) == S.TRIAL_REQUESTS
    assert sw.trial([2] * S.TRIAL_REQUESTS) == [2] * S.TRIAL_REQUESTS  # not larger: no trial
    no_rule = SpeculationSwitch(None, min_accept_rate=0.0)  # nothing to judge: no trials
    assert no_rule.trial(limits) == limits


def _asked_per_call(case_dir, prompts, reference, wrong_every: int):
    """Greedy outputs with the oracle speculator (`wrong_every` 1: every draft wrong; 0: every
    draft right), checked against transformers; the requests asked for drafts per call."""
    asked: list[int] = []

    class CountingOracle(OracleSpeculator):
        name = "counting_oracle"

        def propose(self, requests, max_tokens):
            asked.append(len(requests))
            return super().propose(requests, max_tokens)

    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every)
    pm.add(CountingOracle)
    outs, stats = generate(case_dir, prompts, pm, speculator="counting_oracle")
    assert_same(outs, reference)
    return asked, stats


def test_a_large_batch_probes_with_a_trial_and_outputs_are_unchanged(tiny_llama_dir):
    """24 requests at once: with every draft wrong, the only step that asks for drafts asks
    `TRIAL_REQUESTS` of them (then a cooldown longer than the run); with every draft right,
    the trial passes and the next step asks all the others. Outputs equal transformers' either
    way."""
    from test_engine_parity import hf_reference

    prompts = test_speculative.repetitive_prompts(512, n=24, seed=3)
    reference = [t for t, _ in hf_reference(tiny_llama_dir, prompts, MAX_NEW)]
    asked, stats = _asked_per_call(tiny_llama_dir, prompts, reference, wrong_every=1)
    assert asked == [S.TRIAL_REQUESTS] and stats["spec_accepted_tokens"] == 0
    assert stats["spec_switch_trials"] == 1
    asked, stats = _asked_per_call(tiny_llama_dir, prompts, reference, wrong_every=0)
    # the oracle drafts a request's whole completion: the trial's requests finish in their
    # verify step, and the step after the trial asks every other request at once
    assert asked == [S.TRIAL_REQUESTS, 24 - S.TRIAL_REQUESTS]
    assert stats["spec_accepted_tokens"] > 0


def test_every_request_of_a_large_batch_drafts_within_a_small_token_budget(tiny_llama_dir):
    """The step's token budget is shared out by what the speculator drafts at most
    (`chain_length`), not by what each request could still take: 24 decoding requests whose
    limits (their remaining max_tokens, up to 19) would take a budget of 128 - 24 tokens in ~6
    requests all get their 3 drafts. (At batch 64 with 1,024 new tokens on the H200, 9-11 of
    64 requests drafted before this cap: session 20.)"""
    from test_engine_parity import hf_reference

    prompts = test_speculative.repetitive_prompts(512, n=24, seed=4)
    reference = [t for t, _ in hf_reference(tiny_llama_dir, prompts, MAX_NEW)]
    asked: list[list[int]] = []

    class ChainOracle(OracleSpeculator):
        name = "chain_oracle"

        def chain_length(self) -> int:
            return 3

        def propose(self, requests, max_tokens):
            asked.append(list(max_tokens))
            return super().propose(requests, max_tokens)

    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=0)
    pm.add(ChainOracle)
    outs, _ = generate(
        tiny_llama_dir, prompts, pm, speculator="chain_oracle", max_num_batched_tokens=128,
        speculative_min_accept_rate=0.0,  # (no trials: every request may draft at once)
    )  # fmt: skip
    assert_same(outs, reference)
    assert [3] * 24 in asked  # (a step of 24 decoding requests; earlier ones still prefilled)
