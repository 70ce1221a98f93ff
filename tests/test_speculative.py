"""Speculative decoding is lossless (DESIGN.md §7): in float32 on CPU, greedy outputs with any
speculator equal the non-speculative outputs and transformers' `generate`, whatever the batching,
chunking, preemption, prefix-cache hits or swaps; rejected drafts never reach a prefix cache
and leak no page; a perfect draft is always accepted."""

from __future__ import annotations

import contextlib
import random

import pytest
from fixtures import build_tiny_model
from pegboard.core.config import EngineConfig
from pegboard.core.engine import Engine
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginError, PluginManager
from pegboard.core.speculative import SpeculatorError
from pegboard.plugins.speculative.ngram import NgramIndex, follow, lookup
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, Request, SamplingParams
from test_engine_parity import hf_reference

MAX_NEW = 20


def repetitive_prompts(vocab: int, n: int = 6, seed: int = 0) -> list[list[int]]:
    """Prompts that repeat a random phrase (n-gram lookup finds drafts in them)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        phrase = [rng.randrange(8, vocab) for _ in range(rng.randint(3, 10))]
        out.append(phrase * rng.randint(2, 4))
    return out


@pytest.fixture(scope="module")
def case(tiny_llama_dir):
    prompts = repetitive_prompts(512)
    reference = [tokens for tokens, _ in hf_reference(tiny_llama_dir, prompts, MAX_NEW)]
    return tiny_llama_dir, prompts, reference


class OracleSpeculator(Speculator):
    """Test speculator: proposes the reference continuation, wrong at every `wrong_every`-th
    draft position (so verification must cut chains in the middle and roll back)."""

    name = "oracle"
    reference: dict[tuple[int, ...], list[int]] = {}
    wrong_every = 0
    calls = 0

    def propose(self, requests, max_tokens):
        type(self).calls += 1
        out = []
        for r, k in zip(requests, max_tokens):
            ref = self.reference.get(tuple(r.prompt_token_ids), [])
            done = r.num_output_tokens
            tokens = list(ref[done : done + k])
            for i in range(len(tokens)):
                if self.wrong_every and (done + i) % self.wrong_every == self.wrong_every - 1:
                    tokens[i] = (tokens[i] + 1) % 512
            out.append(Drafts(tokens))
        return out


def oracle_plugins(reference: dict, wrong_every: int) -> PluginManager:
    OracleSpeculator.reference = reference
    OracleSpeculator.wrong_every = wrong_every
    OracleSpeculator.calls = 0
    pm = PluginManager()
    pm.add(OracleSpeculator)
    return pm


def generate(model_dir, prompts, plugins=None, params=None, **settings):
    params = params or SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=plugins, **settings) as llm:
        outs = llm.generate(prompts, params)
        return outs, llm.engine.speculation.stats()


def assert_same(outs, reference):
    for i, (out, ref) in enumerate(zip(outs, reference)):
        assert out.error is None, out.error
        assert out.token_ids == ref, f"prompt {i}: {out.token_ids} != {ref}"


# ---------------------------------------------------------------- n-gram lookup


def test_ngram_lookup_copies_what_followed_the_latest_earlier_match():
    assert lookup([1, 2, 3, 4, 1, 2], 3, 1, 3) == [3, 4, 1]
    assert lookup([9, 1, 2, 7, 1, 2, 8, 1, 2], 2, 1, 3) == [8, 1]  # latest match wins
    assert lookup([5, 6, 7], 2, 1, 3) == []


def test_ngram_lookup_continues_a_loop_past_the_contexts_end():
    """A match near the end (a short phrase repeating) drafts the full length, periodically,
    instead of the few tokens left before the end."""
    assert lookup([7, 5, 6, 5, 6], 4, 1, 3) == [5, 6, 5, 6]  # was [5, 6]
    assert lookup([3, 3, 3, 3], 4, 1, 3) == [3, 3, 3, 3]  # was [3]
    assert lookup([1, 2, 3, 1, 2], 5, 1, 3) == [3, 1, 2, 3, 1]  # was [3, 1, 2]


def test_ngram_lookup_prefers_the_longest_suffix():
    # suffix [3, 4] occurs at 2; the 1-gram [4] occurs later at 6 but is shorter
    assert lookup([0, 0, 3, 4, 9, 5, 4, 1, 3, 4], 1, 1, 2) == [9]


def _scan(tokens: list[int], depth: int, min_n: int, max_n: int, keep: int) -> list[list[int]]:
    """`NgramIndex.continuations` by its definition: for the longest suffix (max_n down to
    min_n tokens) that also ends earlier, before the last token, what followed its latest
    `keep` occurrences, latest first."""
    for n in range(min(max_n, len(tokens) - 1), min_n - 1, -1):
        suffix = tokens[len(tokens) - n :]
        ends = [e for e in range(len(tokens) - 2, n - 2, -1) if tokens[e - n + 1 : e + 1] == suffix]
        if ends:
            return [follow(tokens, e, depth) for e in ends[:keep]]
    return []


@pytest.mark.parametrize("keep", [1, 3])
def test_ngram_index_finds_what_a_scan_of_the_context_finds(keep):
    """Updated step by step as a request grows (and cut back, as a stop string does), the index
    finds the same continuations as scanning the whole context. Token ids whose bytes repeat
    across token boundaries (256, 65536, ...) check that a byte match straddling two tokens
    is no match (the index searches the context's 32-bit integers as bytes)."""
    rng = random.Random(keep)
    alphabet = [0, 1, 2, 256, 257, 65536, 65537, 1 << 24, 151_000]
    for _ in range(40):
        index = NgramIndex(1, 3, keep)
        tokens = [rng.choice(alphabet) for _ in range(rng.randint(1, 8))]
        for _ in range(30):
            if rng.random() < 0.1:
                del tokens[-rng.randint(1, len(tokens)) :]  # cut back, seen by an update
                index.update(tokens)
            tokens += [rng.choice(alphabet) for _ in range(rng.randint(1, 6))]
            index.update(tokens)
            assert index.continuations(tokens, 4) == _scan(tokens, 4, 1, 3, keep), tokens


def test_ngram_lookup_after_a_long_stretch_without_drafts_runs_no_python_per_token():
    """A request that drafted nothing for many steps (the on/off switch kept speculation off)
    costs its next lookup no more Python than one step later would: the tokens decoded
    meanwhile are not indexed one by one (session 12: a probe at batch 64 after 128 undrafted
    steps spent ~22 ms catching up on a CPU; it counts lines run in ngram.py here)."""
    import sys

    from pegboard.plugins.speculative import ngram

    rng = random.Random(0)
    speculator = ngram.NgramSpeculator.__new__(ngram.NgramSpeculator)
    speculator.options = ngram.NgramOptions()

    def lines_of_propose(request) -> int:
        count = [0]

        def trace(frame, event, arg):
            if frame.f_code.co_filename == ngram.__file__:
                count[0] += event == "line"
                return trace
            return None

        sys.settrace(trace)
        try:
            speculator.propose([request], [4])
        finally:
            sys.settrace(None)
        return count[0]

    r = Request([rng.randrange(1000) for _ in range(128)], SamplingParams(max_tokens=1000))
    speculator.propose([r], [4])
    r.token_ids.append(rng.randrange(1000))
    one_step = lines_of_propose(r)  # one token since the last lookup
    r.token_ids.extend(rng.randrange(1000) for _ in range(256))
    # 256 tokens since the last lookup: a few lines more at most (which suffix matches, how far
    # the match is followed); an index built per token and n runs ~3,000 more
    assert lines_of_propose(r) <= one_step + 40


# ---------------------------------------------------------------- greedy parity


SETTINGS = [
    pytest.param({}, id="default"),
    pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
    pytest.param({"kv_cache_tokens": 96, "page_size": 4}, id="preemption"),
    pytest.param({"kv_cache": "radix", "page_size": 4}, id="radix"),
    pytest.param({"kv_cache": "hicache", "page_size": 4}, id="hicache"),
]


@pytest.mark.parametrize("settings", SETTINGS)
def test_ngram_greedy_equals_transformers(case, settings):
    model_dir, prompts, reference = case
    outs, stats = generate(model_dir, prompts, speculator="ngram", **settings)
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0


@pytest.mark.parametrize("settings", SETTINGS)
def test_rejected_drafts_are_rolled_back(case, settings):
    """Every third draft is wrong: chains are cut mid-way and the KV past the cut is dropped;
    the output is still the reference, and the correct drafts were accepted."""
    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=3)
    outs, stats = generate(model_dir, prompts, pm, speculator="oracle", **settings)
    assert_same(outs, reference)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_perfect_drafts_are_all_accepted(case):
    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=0)
    outs, stats = generate(model_dir, prompts, pm, speculator="oracle")
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    assert stats["spec_accept_length"] > 2.0  # several tokens per verify step


def test_radix_cache_never_holds_rejected_tokens(case):
    """Wrong drafts everywhere; then prompts that extend the first ones hit the cached
    prefix. Had a rejected draft been inserted, the hit would carry its KV and tokens."""
    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): [7] * MAX_NEW for p in prompts}, wrong_every=0)
    settings = {"kv_cache": "radix", "page_size": 2, "speculator": "oracle"}
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, **settings) as llm:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        outs = llm.generate(prompts, params)
        assert_same(outs, reference)
        tree_tokens = _tree_sequences(llm.engine.kv)
        for seq in tree_tokens:  # every cached sequence is a prefix of a real prompt + output
            assert any((list(p) + ref)[: len(seq)] == seq for p, ref in zip(prompts, reference)), (
                f"the radix tree holds a sequence that was never generated: {seq}"
            )
        longer = [list(p) + ref[:5] for p, ref in zip(prompts, reference)]
        again = llm.generate(longer, params)
        assert any(o.num_cached_tokens > 0 for o in again)
    plain, _ = generate(model_dir, longer)
    assert [o.token_ids for o in again] == [o.token_ids for o in plain]


def _tree_sequences(cache) -> list[list[int]]:
    """Token sequences from the radix tree's root to each node."""
    out = []

    def walk(node, prefix):
        for child in node.children.values():
            seq = prefix + list(child.key)
            out.append(seq)
            walk(child, seq)

    walk(cache.tree.root, [])
    return out


def test_no_page_leaks_step_by_step(case):
    """After every step the paged cache's pages are free xor held; at the end all are free."""
    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=2)
    config = EngineConfig(
        model=str(model_dir), dtype="float32", device="cpu", speculator="oracle", page_size=2
    )
    engine = Engine(config, pm)
    try:
        requests = [
            Request(p, SamplingParams(max_tokens=MAX_NEW, temperature=0.0)) for p in prompts
        ]
        for r in requests:
            engine.add_request(r)
        while engine.has_work():
            engine.step()
            engine.kv.check_invariants(engine.running)
        assert engine.kv.num_free_pages == engine.kv.num_pages
        assert [r.output_token_ids for r in requests] == reference
        assert sum(r.num_accepted_tokens for r in requests) > 0
        assert all(r.num_draft_tokens >= r.num_accepted_tokens for r in requests)
    finally:
        engine.close()


# ---------------------------------------------------------------- draft model


def test_target_as_its_own_draft_is_always_accepted(case):
    model_dir, prompts, reference = case
    options = {"draft": {"model_path": str(model_dir), "num_draft_tokens": 3}}
    outs, stats = generate(model_dir, prompts, speculator="draft", plugin_options=options)
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0


def test_a_random_weight_target_is_its_own_perfect_draft(case, tmp_path):
    """`--load-format dummy`: the draft draws the same random weights from the same config
    (the `spec-perfect` benchmark on Llama-3.1-8B's config relies on it)."""
    import shutil

    model_dir, prompts, _ = case
    config_only = tmp_path / "config-only"
    config_only.mkdir()
    shutil.copy(model_dir / "config.json", config_only / "config.json")
    options = {"draft": {"model_path": str(config_only), "num_draft_tokens": 3}}
    plain, _ = generate(config_only, prompts, load_format="dummy")
    outs, stats = generate(
        config_only, prompts, load_format="dummy", speculator="draft", plugin_options=options
    )
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    assert _parse("--draft-load-format", "dummy")["plugin_options"]["draft"] == {
        "load_format": "dummy"
    }


@pytest.mark.parametrize("settings", SETTINGS[:3])
def test_other_draft_model_greedy_equals_transformers(case, tmp_path_factory, settings):
    model_dir, prompts, reference = case
    draft = build_tiny_model(tmp_path_factory.mktemp("draft"), "llama", seed=1, num_hidden_layers=1)
    options = {"draft": {"model_path": str(draft), "num_draft_tokens": 4}}
    outs, stats = generate(
        model_dir, prompts, speculator="draft", plugin_options=options, **settings
    )
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]


def test_swapping_the_speculator_mid_run_changes_no_token(case):
    model_dir, prompts, reference = case
    options = {"draft": {"model_path": str(model_dir)}}
    with LLM(
        str(model_dir), dtype="float32", device="cpu", speculator="ngram", plugin_options=options
    ) as llm:
        outputs, swapped = generate_swapping(llm, prompts, "draft", model_path=str(model_dir))
        assert swapped.result().active == "draft"
        assert outputs == reference


def generate_swapping(llm, prompts, speculator: str, **options):
    """Greedy outputs of `prompts`, swapping to `speculator` once a request has more than 3
    output tokens; returns (token ids per prompt, the swap's future)."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    requests = [Request(p, params) for p in prompts]
    for r in requests:
        llm.engine.add_request(r)
    swapped = None
    while llm.engine.has_work():
        llm.engine.step()
        if swapped is None and any(r.num_output_tokens > 3 for r in requests):
            swapped = llm.swap("speculator", speculator, **options)
    return [r.output_token_ids for r in requests], swapped


# ---------------------------------------------------------------- bad input


def test_unknown_speculator_fails_before_the_model_loads(case, monkeypatch):
    model_dir, _, _ = case
    monkeypatch.setattr("pegboard.core.engine.ModelRunner", _no_load)
    with pytest.raises(PluginError, match="unknown speculator 'eagle9'"):
        LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle9")


def test_draft_with_another_vocabulary_fails_before_the_model_loads(case, tmp_path, monkeypatch):
    model_dir, _, _ = case
    draft = build_tiny_model(tmp_path / "draft", "llama", vocab_size=600)
    monkeypatch.setattr("pegboard.core.engine.ModelRunner", _no_load)
    options = {"draft": {"model_path": str(draft)}}
    with pytest.raises(SpeculatorError, match=r"vocabulary \(600 tokens.*target's \(512\)"):
        LLM(
            str(model_dir),
            dtype="float32",
            device="cpu",
            speculator="draft",
            plugin_options=options,
        )


def test_draft_without_a_model_path_fails_before_the_model_loads(case, monkeypatch):
    model_dir, _, _ = case
    monkeypatch.setattr("pegboard.core.engine.ModelRunner", _no_load)
    with pytest.raises(SpeculatorError, match="needs a draft model"):
        LLM(str(model_dir), dtype="float32", device="cpu", speculator="draft")


def _no_load(*args, **kwargs):
    raise AssertionError("the target model was loaded before the speculator was checked")


def test_a_failing_speculator_fails_no_request(case):
    model_dir, prompts, reference = case

    class Broken(Speculator):
        name = "broken"

        def propose(self, requests, max_tokens):
            return [Drafts([999999])] * len(requests)  # out of the vocabulary

    pm = PluginManager()
    pm.add(Broken)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, speculator="broken") as llm:
        outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
        assert llm.engine.guard.errors[("speculator", "broken")] > 0
    assert_same(outs, reference)


# ---------------------------------------------------------------- SGLang's flags


def _parse(*flags):
    import argparse

    from pegboard.core.cli.engine_args import add_engine_arguments, engine_settings

    parser = argparse.ArgumentParser()
    add_engine_arguments(parser)
    return engine_settings(parser.parse_args(list(flags)))


def test_sglang_flags_select_the_draft_speculator():
    s = _parse(
        "--speculative-algorithm",
        "standalone",
        "--speculative-draft-model-path",
        "/d",
        "--speculative-num-draft-tokens",
        "5",
    )
    assert s["speculator"] == "draft"
    assert s["plugin_options"]["draft"] == {"model_path": "/d", "num_draft_tokens": 4}


def test_sglang_flags_select_ngram_with_num_steps():
    s = _parse("--speculative-algorithm", "NGRAM", "--speculative-num-steps", "3")
    assert s["speculator"] == "ngram"
    assert s["plugin_options"]["ngram"] == {"num_draft_tokens": 3}


@pytest.mark.parametrize(
    "flags",
    [
        ("--speculative-algorithm", "MEDUSA"),
        ("--speculative-algorithm", "NGRAM", "--speculative-eagle-topk", "0"),
        ("--speculative-algorithm", "NGRAM", "--speculative-disable-by-batch-size", "x"),
    ],
)
def test_unsupported_speculative_flags_exit_2(flags, capsys):
    with pytest.raises(SystemExit) as exc:
        _parse(*flags)
    assert exc.value.code == 2
    assert "speculative" in capsys.readouterr().err


def test_sglang_tree_flags_set_topk_depth_and_tree_size():
    s = _parse("--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "/h",
               "--speculative-num-steps", "3", "--speculative-eagle-topk", "4",
               "--speculative-num-draft-tokens", "8")  # fmt: skip
    assert s["plugin_options"]["eagle"] == {
        "model_path": "/h", "topk": 4, "num_steps": 3, "num_draft_tokens": 7,
    }  # fmt: skip
    s = _parse("--speculative-algorithm", "NGRAM", "--speculative-num-steps", "2",
               "--speculative-eagle-topk", "3", "--speculative-disable-by-batch-size", "32",
               "--speculative-min-accept-rate", "0.3")  # fmt: skip
    assert s["plugin_options"]["ngram"] == {"topk": 3, "num_steps": 2, "num_draft_tokens": 6}
    assert s["speculative_disable_by_batch_size"] == 32
    assert s["speculative_min_accept_rate"] == 0.3


def test_standalone_tree_flags():
    s = _parse("--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path", "/d",
               "--speculative-eagle-topk", "2", "--speculative-num-steps", "3")  # fmt: skip
    assert s["plugin_options"]["draft"] == {
        "model_path": "/d", "topk": 2, "num_steps": 3, "num_draft_tokens": 6,
    }  # fmt: skip


# ---------------------------------------------------------------- metrics


def test_acceptance_is_counted_per_request_and_in_prometheus(case):
    from pegboard.plugins.metrics.prometheus import PrometheusExporter

    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=3)
    with LLM(
        str(model_dir),
        dtype="float32",
        device="cpu",
        plugins=pm,
        speculator="oracle",
        metrics=["prometheus"],
    ) as llm:
        params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
        requests = [Request(p, params) for p in prompts]
        for r in requests:
            llm.engine.add_request(r)
        while llm.engine.has_work():
            llm.engine.step()
        exporter = next(p for p in pm.active_all("metrics") if isinstance(p, PrometheusExporter))
        text = exporter.render().decode()
    accepted = sum(r.num_accepted_tokens for r in requests)
    drafted = sum(r.num_draft_tokens for r in requests)
    assert 0 < accepted < drafted
    assert f'pegboard:spec_accepted_tokens_total{{model_name="{model_dir}"}} {accepted}.0' in text
    assert f'pegboard:spec_draft_tokens_total{{model_name="{model_dir}"}} {drafted}.0' in text


def test_bench_offline_reports_acceptance(case, tmp_path):
    """The target as its own STANDALONE draft: at temperature 0.6 the draft's distribution is
    the target's, so rejection sampling accepts every draft."""
    import json

    from pegboard.core.cli.main import main

    model_dir, _, _ = case
    out = tmp_path / "offline.json"
    rc = main(
        ["bench", "offline", "--model", str(model_dir), "--dtype", "float32", "--device", "cpu",
         "--num-seqs", "2", "--min-input", "8", "--max-input", "16", "--max-token-id", "500",
         "--min-output", "8", "--max-output", "12", "--json", str(out),
         "--speculative-algorithm", "STANDALONE", "--speculative-draft-model-path",
         str(model_dir), "--speculative-num-steps", "3"]
    )  # fmt: skip
    assert rc == 0
    spec = json.loads(out.read_text())["speculation"]
    assert spec["speculator"] == "draft" and spec["verify_steps"] > 0
    assert spec["accept_rate"] == pytest.approx(1.0, abs=0.02)
    assert spec["accept_length"] > 2.5


# ---------------------------------------------------------------- conformance


def test_builtin_speculators_conform(tiny_llama_dir):
    from pegboard.plugins.speculative.draft import DraftModelSpeculator
    from pegboard.plugins.speculative.ngram import NgramSpeculator
    from pegboard.sdk.testing import check_speculator

    check_speculator(NgramSpeculator)
    check_speculator(DraftModelSpeculator, {"model_path": str(tiny_llama_dir)}, vocab_size=512)


def test_conformance_kit_catches_a_speculator_over_its_limit():
    from pegboard.sdk.testing import ConformanceError, check_speculator

    class Greedy(Speculator):
        name = "greedy"

        def propose(self, requests, max_tokens):
            return [Drafts([1] * (k + 1)) for k in max_tokens]

    with pytest.raises(ConformanceError, match=r"at most max_tokens\[i\] tokens"):
        check_speculator(Greedy)


def test_conformance_kit_catches_chains_longer_than_chain_length():
    """`chain_length()` sizes the verify CUDA graphs: a speculator must not exceed it."""
    from pegboard.sdk.testing import ConformanceError, check_speculator

    class Boastful(Speculator):
        name = "boastful"

        def chain_length(self):
            return 1

        def propose(self, requests, max_tokens):
            return [Drafts([1] * k) for k in max_tokens]

    with pytest.raises(ConformanceError, match=r"no chain is longer than chain_length"):
        check_speculator(Boastful)


def test_a_stop_token_inside_an_accepted_chain_ends_the_request_there(case):
    """Perfect drafts run past the stop token; the request ends at it, as without drafts,
    and its pages (with the computed KV past the stop) are all freed."""
    model_dir, prompts, reference = case
    stops = [ref[7] for ref in reference]
    params = [
        SamplingParams(max_tokens=MAX_NEW, temperature=0.0, stop_token_ids=[s]) for s in stops
    ]
    plain, _ = generate(model_dir, prompts, params=params)
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=0)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, speculator="oracle") as llm:
        outs = llm.generate(prompts, params)
        assert llm.engine.kv.num_free_pages == llm.engine.kv.num_pages
    assert [o.token_ids for o in outs] == [o.token_ids for o in plain]
    assert all(o.token_ids[-1] in (s,) for o, s in zip(outs, stops))


def test_seeded_sampling_with_a_draft_model_reproduces(case, tmp_path_factory):
    model_dir, prompts, _ = case
    draft = build_tiny_model(
        tmp_path_factory.mktemp("seeded"), "llama", seed=3, num_hidden_layers=1
    )
    options = {"draft": {"model_path": str(draft)}}
    params = [
        SamplingParams(max_tokens=MAX_NEW, temperature=0.9, seed=i) for i in range(len(prompts))
    ]
    first, stats = generate(
        model_dir, prompts, params=params, speculator="draft", plugin_options=options
    )
    again, _ = generate(
        model_dir, prompts, params=params, speculator="draft", plugin_options=options
    )
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert stats["spec_draft_tokens"] > 0 and all(
        len(o.token_ids) == MAX_NEW or o.finish_reason for o in first
    )


def test_requests_whose_drafts_keep_missing_back_off(case):
    """Always-wrong drafts: after 3 misses in a row a request stops drafting for 2, 4, 8, ...
    steps, so far fewer verify steps run than tokens are generated; outputs unchanged."""
    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=1)
    outs, stats = generate(model_dir, prompts, pm, speculator="oracle")
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] == 0
    assert 0 < stats["spec_verify_steps"] < len(prompts) * (MAX_NEW - 1) / 2


@contextlib.contextmanager
def oracle_requests(case, wrong_every: int):
    """An engine whose speculator is the oracle (`wrong_every`) with the case's prompts queued,
    greedy: (engine, requests), for tests that drive `engine.step()` themselves."""
    model_dir, prompts, reference = case
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm,
             speculator="oracle") as llm:  # fmt: skip
        requests = [Request(p, params) for p in prompts]
        for r in requests:
            llm.engine.add_request(r)
        yield llm.engine, requests


def test_a_verify_step_gives_one_delta_per_request_with_all_its_tokens(case):
    """The accepted drafts and the target's token of a verify step leave the step loop as one
    delta per request (not one per token: the detokenizer and streams get fewer, larger
    deltas); their concatenation is the output."""
    with oracle_requests(case, 0) as (engine, requests):  # every draft right
        streamed = {r.request_id: [] for r in requests}
        widest = 0
        while engine.has_work():
            outputs = engine.step()
            ids = [o.request_id for o in outputs]
            assert len(ids) == len(set(ids))  # one delta per request and step
            for o in outputs:
                streamed[o.request_id] += o.new_token_ids
                widest = max(widest, len(o.new_token_ids))
    assert widest > 1
    assert [streamed[r.request_id] for r in requests] == case[2]
