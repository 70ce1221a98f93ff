"""Drafts on the device (`Drafts.on_device`, issue 14): the verify forward takes the ids from
the speculator's tensor on the device and the host reads them once, with the target's
tokens, after that forward. In float32 on CPU the outputs equal plain decoding, transformers'
and the same drafts handed over as host lists (batching, mixed host and device drafts, chains
of different lengths, a stop token or `max_tokens` inside a chain, sampling); ids outside the
vocabulary are the speculator's fault and change no output; EAGLE's chains take this path
without reading its drafts in `propose`."""

from __future__ import annotations

import pytest
import test_speculative
import torch
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative.step import DraftViolation, check_drafts
from pegboard.plugins.speculative.eagle import EagleSpeculator
from pegboard.sdk.types import DEVICE_DRAFT, Drafts, Request, SamplingParams
from test_speculative import MAX_NEW, SETTINGS, OracleSpeculator, assert_same, generate
from test_speculative_eagle import build_eagle3_head

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs


class DeviceOracle(OracleSpeculator):
    """The oracle's drafts (right but at every `wrong_every`-th position) as device tensors.
    `mix`: the call's request i gets host drafts when `i % 3 == 1`, none when `i % 3 == 2`
    and a chain one shorter when `i % 4 == 3`; `bad`: the last id of the even prompts'
    requests out of the vocabulary."""

    name = "oracle_device"
    mix = False
    bad = False
    device = "cpu"

    def propose(self, requests, max_tokens):
        host = super().propose(requests, max_tokens)
        out = []
        prompts = list(self.reference)
        for i, (r, d) in enumerate(zip(requests, host)):
            tokens = list(d.tokens)
            if self.mix and i % 4 == 3:
                tokens = tokens[:-1]
            if self.mix and i % 3 == 2:
                out.append(Drafts([]))
            elif self.mix and i % 3 == 1:
                out.append(Drafts(tokens))
            else:
                if self.bad and prompts.index(tuple(r.prompt_token_ids)) % 2 == 0:
                    tokens[-1] = 512 + 7
                ids = torch.tensor(tokens, dtype=torch.int64, device=self.device)
                out.append(Drafts.on_device(ids))
        return out


def device_oracle(case, wrong_every: int, speculator=DeviceOracle, mix=False, bad=False,
                  device="cpu") -> PluginManager:  # fmt: skip
    """Plugins with `speculator` (the device oracle, or the host `OracleSpeculator`) set up
    for `case`."""
    _, prompts, reference = case
    speculator.reference = {tuple(p): ref for p, ref in zip(prompts, reference)}
    speculator.wrong_every = wrong_every
    speculator.calls = 0
    DeviceOracle.mix, DeviceOracle.bad, DeviceOracle.device = mix, bad, device
    pm = PluginManager()
    pm.add(speculator)
    return pm


@pytest.mark.parametrize("settings", SETTINGS[:4])
@pytest.mark.parametrize("wrong_every", [0, 3])
def test_device_drafts_equal_transformers_and_host_drafts(case, settings, wrong_every):
    model_dir, prompts, reference = case
    pm = device_oracle(case, wrong_every)
    outs, stats = generate(model_dir, prompts, pm, speculator="oracle_device", **settings)
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] > 0
    host, host_stats = generate(
        model_dir, prompts, device_oracle(case, wrong_every, OracleSpeculator), speculator="oracle",
        **settings,
    )  # fmt: skip
    assert [o.token_ids for o in outs] == [o.token_ids for o in host]
    assert stats == host_stats  # the same drafts, verified the same way


def test_device_drafts_beside_host_drafts_and_none_in_one_batch(case):
    """Requests with device drafts, host drafts, no drafts and shorter chains share verify
    steps (the rows of device drafts are uploaded then, not a view)."""
    model_dir, prompts, reference = case
    outs, stats = generate(model_dir, prompts, device_oracle(case, 4, mix=True),
                           speculator="oracle_device")  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] > 0


def test_a_stop_token_or_max_tokens_inside_a_device_chain_ends_the_request_there(case):
    model_dir, prompts, reference = case
    params = [
        SamplingParams(max_tokens=5 + i, temperature=0.0, stop_token_ids=[ref[9]])
        for i, ref in enumerate(reference)
    ]
    plain, _ = generate(model_dir, prompts, params=params)
    pm = device_oracle(case, 0)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm,
             speculator="oracle_device") as llm:  # fmt: skip
        outs = llm.generate(prompts, params)
        assert llm.engine.kv.num_free_pages == llm.engine.kv.num_pages
        assert llm.engine.speculation.stats()["spec_accepted_tokens"] > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert [o.finish_reason for o in outs] == [o.finish_reason for o in plain]


def test_sampled_requests_with_device_drafts_equal_host_drafts(case):
    model_dir, prompts, _ = case
    params = [
        SamplingParams(max_tokens=MAX_NEW, temperature=0.8, seed=i) for i in range(len(prompts))
    ]
    outs, stats = generate(model_dir, prompts, device_oracle(case, 3), params=params,
                           speculator="oracle_device")  # fmt: skip
    host, host_stats = generate(model_dir, prompts, device_oracle(case, 3, OracleSpeculator),
                                params=params, speculator="oracle")  # fmt: skip
    assert [o.token_ids for o in outs] == [o.token_ids for o in host]
    assert stats == host_stats and stats["spec_accepted_tokens"] > 0


def test_out_of_vocabulary_device_drafts_are_the_speculators_fault(case):
    """Half the requests' device drafts hold ids past the vocabulary: the forward runs on
    clamped ids, the fault is counted against the speculator, those requests accept none of
    their drafts that step, the others keep theirs, and no output changes."""
    model_dir, prompts, reference = case
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    requests = [Request(p, params) for p in prompts]
    with LLM(str(model_dir), dtype="float32", device="cpu",
             plugins=device_oracle(case, 0, bad=True), speculator="oracle_device") as llm:  # fmt: skip
        for r in requests:
            llm.engine.add_request(r)
        while llm.engine.has_work():
            llm.engine.step()
        assert llm.engine.guard.errors[("speculator", "oracle_device")] > 0
    assert [r.output_token_ids for r in requests] == reference
    for i, r in enumerate(requests):  # (perfect drafts: every good one is accepted)
        if i % 2:
            assert r.num_accepted_tokens == r.num_draft_tokens > 0
        else:
            assert r.num_accepted_tokens == 0 and r.num_draft_tokens > 0


@pytest.mark.parametrize(
    "drafts, message",
    [
        (Drafts([DEVICE_DRAFT] * 2, device_tokens=torch.zeros(1, 2, dtype=torch.int64)), "1-D"),
        (Drafts([DEVICE_DRAFT] * 2, device_tokens=torch.zeros(2)), "integer"),
        (Drafts([1, 2], device_tokens=torch.zeros(2, dtype=torch.int64)), "placeholders"),
        (Drafts([DEVICE_DRAFT], device_tokens=torch.zeros(2, dtype=torch.int64)), "placeholders"),
        (Drafts.on_device(torch.zeros(2, dtype=torch.int64)), None),
        (
            Drafts([DEVICE_DRAFT] * 2, [-1, 0], device_tokens=torch.zeros(2, dtype=torch.int64)),
            "chains",
        ),
        (Drafts([DEVICE_DRAFT] * 2), "outside"),  # placeholders without the tensor
    ],
)
def test_the_form_of_device_drafts_is_checked_at_propose(drafts, message):
    r = Request([1, 2, 3], SamplingParams(max_tokens=8))
    if message is None:
        assert check_drafts([drafts], [r], [4], 512, "cpu") == [drafts]
        return
    with pytest.raises(DraftViolation, match=message):
        check_drafts([drafts], [r], [4], 512, "cpu")


def test_device_drafts_on_another_device_are_refused():
    r = Request([1, 2, 3], SamplingParams(max_tokens=8))
    drafts = Drafts.on_device(torch.zeros(2, dtype=torch.int64, device="meta"))
    with pytest.raises(DraftViolation, match="not cpu"):
        check_drafts([drafts], [r], [4], 512, "cpu")


def test_eagle_chains_stay_on_the_device_until_the_verify(case, tmp_path, monkeypatch):
    """EAGLE-3's chains reach the verify as device drafts: `propose` never reads them, a
    verify step waits once (`read_tokens`); outputs equal transformers' and the host path's
    (`device_drafts` off)."""
    model_dir, prompts, reference = case
    head = str(build_eagle3_head(tmp_path / "eagle3"))
    reads = {"drafts": 0, "tokens": 0}
    read_drafts = EagleSpeculator.read_drafts

    def counted(drafts):
        reads["drafts"] += 1
        return read_drafts(drafts)

    monkeypatch.setattr(EagleSpeculator, "read_drafts", staticmethod(counted))
    runs = {}
    for on_device in (True, False):
        options = {"eagle": {"model_path": head, "device_drafts": on_device}}
        with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
                 plugin_options=options) as llm:  # fmt: skip
            spec = llm.engine.speculation
            read_tokens = spec.read_tokens

            def count_tokens(tokens, read_tokens=read_tokens):
                reads["tokens"] += 1
                return read_tokens(tokens)

            spec.read_tokens = count_tokens
            before = dict(reads)
            outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
            stats = spec.stats()
        assert_same(outs, reference)
        assert stats["spec_draft_tokens"] > 0
        drafts_read = reads["drafts"] - before["drafts"]
        # (one read per verify step, which verifies one or more requests)
        assert 0 < reads["tokens"] - before["tokens"] <= stats["spec_verify_steps"]
        assert (drafts_read == 0) if on_device else (drafts_read > 0)
        runs[on_device] = ([o.token_ids for o in outs], stats)
    assert runs[True] == runs[False]
