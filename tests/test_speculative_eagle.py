"""EAGLE heads (random weights, SGLang's checkpoint formats): speculation with them is
lossless in float32 on CPU (transformers as the oracle) across chunked prefill, preemption and
radix hits; the head reads the target's hidden states (three auxiliary layers for EAGLE-3)
and maps its reduced vocabulary with `d2t`; a head for another target fails before loading."""

from __future__ import annotations

import json

import pytest
import test_speculative
import torch
from pegboard.core.llm import LLM
from pegboard.core.speculative import SpeculatorError
from pegboard.sdk.types import SamplingParams
from safetensors.torch import save_file
from test_speculative import SETTINGS, assert_same, generate

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs

H, INTER, HEADS, KV_HEADS, VOCAB, DRAFT_VOCAB = 64, 128, 4, 2, 512, 256


def build_eagle3_head(path, hidden=H, aux=(0, 0, 1), seed=0, attention_heavy=False):
    """An EAGLE-3 head as SGLang loads it: `fc` over three target layers, `midlayer` with
    2 * hidden wide q/k/v inputs, `norm`, a reduced `lm_head` and `d2t` (draft id i -> 2i).
    `attention_heavy`: a small `fc` and large attention weights, so the drafts depend on
    which of the head's keys each row attends to (not only on its own features)."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * (0.6 if attention_heavy else 0.2)).contiguous()

    hd = H // HEADS
    tensors = {
        "fc.weight": w(H, 3 * hidden) * (0.005 if attention_heavy else 1.0),
        "midlayer.hidden_norm.weight": torch.ones(H),
        "midlayer.input_layernorm.weight": torch.ones(H),
        "midlayer.post_attention_layernorm.weight": torch.ones(H),
        "midlayer.self_attn.q_proj.weight": w(HEADS * hd, 2 * H),
        "midlayer.self_attn.k_proj.weight": w(KV_HEADS * hd, 2 * H),
        "midlayer.self_attn.v_proj.weight": w(KV_HEADS * hd, 2 * H),
        "midlayer.self_attn.o_proj.weight": w(H, HEADS * hd),
        "midlayer.mlp.gate_proj.weight": w(INTER, H),
        "midlayer.mlp.up_proj.weight": w(INTER, H),
        "midlayer.mlp.down_proj.weight": w(H, INTER),
        "norm.weight": torch.ones(H),
        "lm_head.weight": w(DRAFT_VOCAB, H),
        "d2t": torch.arange(DRAFT_VOCAB),  # draft id i -> target id i + i
        "t2d": torch.arange(VOCAB) % 2 == 0,
    }
    config = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "hidden_size": H,
        "target_hidden_size": hidden,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "draft_vocab_size": DRAFT_VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
        "eagle_config": {"eagle_aux_hidden_state_layer_ids": list(aux)},
    }
    return _save(path, config, tensors)


def build_eagle1_head(path, seed=0):
    """An EAGLE-1/2 head: `fc` over [embedding, hidden], `layers.0` without its input norm."""
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * 0.2).contiguous()

    hd = H // HEADS
    p = "layers.0."
    tensors = {
        "fc.weight": w(H, 2 * H),
        p + "post_attention_layernorm.weight": torch.ones(H),
        p + "self_attn.q_proj.weight": w(HEADS * hd, H),
        p + "self_attn.k_proj.weight": w(KV_HEADS * hd, H),
        p + "self_attn.v_proj.weight": w(KV_HEADS * hd, H),
        p + "self_attn.o_proj.weight": w(H, HEADS * hd),
        p + "mlp.gate_proj.weight": w(INTER, H),
        p + "mlp.up_proj.weight": w(INTER, H),
        p + "mlp.down_proj.weight": w(H, INTER),
    }
    config = {
        "architectures": ["LlamaForCausalLMEagle"],
        "hidden_size": H,
        "intermediate_size": INTER,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "num_hidden_layers": 1,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
    }
    return _save(path, config, tensors)


def _save(path, config, tensors):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(tensors, str(path / "model.safetensors"))
    return path


@pytest.fixture(scope="module")
def eagle_case(tmp_path_factory):
    root = tmp_path_factory.mktemp("eagle")
    return build_eagle3_head(root / "eagle3"), build_eagle1_head(root / "eagle1")


@pytest.mark.parametrize("settings", SETTINGS[:4])
def test_eagle3_head_is_lossless(case, eagle_case, settings):
    model_dir, prompts, reference = case
    head = eagle_case[0]
    outs, stats = generate(
        model_dir, prompts, speculator="eagle", plugin_options={"eagle": {"model_path": str(head)}},
        **settings,
    )  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0


def test_eagle3_head_in_a_batch_of_24_is_lossless_through_the_switchs_trials(
    tiny_llama_dir, eagle_case
):
    """24 requests at once: the switch's probes are trials (16 of them draft; the head catches
    up only those), its random head's drafts are rejected, drafting pauses, and the next trial
    asks the next requests, whose head entries start late; greedy outputs equal transformers'."""
    from pegboard.core.speculative import switch as S
    from test_engine_parity import hf_reference
    from test_speculative import repetitive_prompts

    prompts = repetitive_prompts(512, n=24, seed=5)
    new = S.LARGE_BATCH_COOLDOWN + 16  # a second trial after the first pause
    reference = [t for t, _ in hf_reference(tiny_llama_dir, prompts, new)]
    params = SamplingParams(max_tokens=new, temperature=0.0)
    outs, stats = generate(
        tiny_llama_dir, prompts, params=params, speculator="eagle",
        plugin_options={"eagle": {"model_path": str(eagle_case[0])}},
        speculative_min_accept_rate=0.9,  # (a random head's drafts: some accepted, not 90 %)
    )  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_switch_trials"] >= 2 and stats["spec_draft_tokens"] > 0
    assert stats["spec_verify_steps"] <= stats["spec_switch_trials"] * S.TRIAL_REQUESTS


def test_eagle1_head_is_lossless(case, eagle_case):
    model_dir, prompts, reference = case
    options = {"eagle": {"model_path": str(eagle_case[1])}}
    outs, stats = generate(model_dir, prompts, speculator="eagle", plugin_options=options)
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0


def test_eagle3_reads_three_target_layers_and_maps_draft_ids(case, eagle_case):
    model_dir, prompts, _ = case
    seen = []
    options = {"eagle": {"model_path": str(eagle_case[0])}}
    with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
             plugin_options=options) as llm:  # fmt: skip
        spec = llm.engine.plugins.active("speculator")
        original = spec.propose

        def propose(requests, max_tokens):
            out = original(requests, max_tokens)
            seen.extend(t for d in out for t in d.host_tokens())
            return out

        spec.propose = propose
        llm.engine.plugins.unregister(spec)
        llm.engine.plugins.register(spec)
        llm.generate(prompts[:2], SamplingParams(max_tokens=8, temperature=0.0))
        assert spec.target_layers == [1, 1, 2]  # aux ids (0, 0, 1) + 1; 2 = after the last
        assert spec.head.fc.in_features == 3 * H
    assert seen and all(t % 2 == 0 for t in seen)  # d2t maps draft id i to target id 2i


def test_eagle_flags_select_the_head(eagle_case):
    from test_speculative import _parse

    s = _parse("--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path", "/h",
               "--speculative-num-steps", "3")  # fmt: skip
    assert s["speculator"] == "eagle"
    assert s["plugin_options"]["eagle"] == {"model_path": "/h", "num_draft_tokens": 3}


def test_head_for_another_hidden_size_fails_before_the_model_loads(case, tmp_path, monkeypatch):
    model_dir, _, _ = case
    head = build_eagle3_head(tmp_path / "wide", hidden=128)
    monkeypatch.setattr("pegboard.core.engine.ModelRunner", _no_load)
    with pytest.raises(SpeculatorError, match="hidden states of size 128, the target's are 64"):
        LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
            plugin_options={"eagle": {"model_path": str(head)}})  # fmt: skip


def test_a_draft_model_is_not_an_eagle_head(case, monkeypatch):
    model_dir, _, _ = case
    monkeypatch.setattr("pegboard.core.engine.ModelRunner", _no_load)
    with pytest.raises(SpeculatorError, match="not an EAGLE head"):
        LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
            plugin_options={"eagle": {"model_path": str(model_dir)}})  # fmt: skip


@pytest.mark.parametrize("rows", [5, 300])
def test_fused_norms_and_rope_draft_as_the_torch_ops(eagle_case, rows):
    """Where the target runs fused Triton kernels (CUDA), the head runs its norms and rope as
    them too (`use_fused_kernels`; here in Triton's interpreter, float32) and its projections
    as the target's (stacked q/k/v and gate/up through `dense.linear`; a catch-up of more than
    256 rows through `fixed_rows`' pieces): the same outputs and drafts as its PyTorch ops,
    over a catch-up step and a draft step."""
    import types

    pytest.importorskip("triton", reason="triton is not installed")
    from pegboard.plugins.speculative.eagle import EagleHead

    config = json.loads((eagle_case[0] / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    embed = torch.nn.Embedding.from_pretrained(torch.randn(VOCAB, H, generator=g))
    target = types.SimpleNamespace(
        model=types.SimpleNamespace(embed_tokens=embed), compute_logits=None
    )  # (EAGLE-3: the head's own LM head)
    feats = torch.randn(rows, 3 * H, generator=g)
    ids = torch.randint(0, VOCAB, (rows,), generator=g)
    positions = torch.arange(40, 40 + rows)
    runs = []
    for fused in (False, True):
        head = EagleHead(config, True, target, str(eagle_case[0])).eval()
        if fused:
            head.use_fused_kernels()
        with torch.no_grad():
            out = head.step(feats, ids, positions, _MixingAttention(), first=True)
            drafts = head.draft_ids(out)
            out2 = head.step(out, drafts, positions + 1, _MixingAttention(), first=False)
            runs.append((out, out2, drafts, head.draft_ids(out2)))
    assert head.norm.kernel is not None and head.rotary.kernel is not None  # (the fused run)
    # q/k/v and gate/up as one weight each, the projections' weights views of it (one copy)
    assert head.qkv_weight.shape[0] == sum(head.qkv_split)
    assert head.k_proj.weight.data_ptr() == head.qkv_weight[head.qkv_split[0] :].data_ptr()
    assert head.up_proj.weight.data_ptr() == head.gate_up_weight.chunk(2)[1].data_ptr()
    for torch_ops, fused in zip(*runs):
        if torch_ops.is_floating_point():  # (1e-5 failed by 3.7e-5 at one torch thread, and
            # 1e-4 at 2 of 19,200 values of 300 rows: float32 sums in other orders)
            torch.testing.assert_close(fused, torch_ops, rtol=1e-4, atol=3e-4)
        else:
            assert torch.equal(fused, torch_ops)


class _MixingAttention:
    """Causal-free attention over the step's own rows (rope and values both count)."""

    def forward(self, layer, q, k, v):
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        weights = torch.einsum("thd,shd->hts", q, k).softmax(-1)
        return torch.einsum("hts,shd->thd", weights, v)


def _no_load(*args, **kwargs):
    raise AssertionError("the target model was loaded before the speculator was checked")


def record_drafts(llm) -> tuple[dict, list[int]]:
    """Wrap the active speculator's `propose`: returns (drafts by the request's context, the
    number of requests given drafts per call), filled as the engine runs."""
    seen, sizes = {}, []
    spec = llm.engine.plugins.active("speculator")
    original = spec.propose

    def propose(requests, max_tokens):
        out = original(requests, max_tokens)
        sizes.append(sum(1 for d in out if d.tokens))
        seen.update(
            (tuple(r.token_ids), d.host_tokens()) for r, d in zip(requests, out) if d.tokens
        )
        return out

    spec.propose = propose
    llm.engine.plugins.unregister(spec)
    llm.engine.plugins.register(spec)
    return seen, sizes


def snapshot_after_propose(llm, take) -> list:
    """`take(speculator)` after every `propose` of the active speculator, filled as it runs."""
    spec = llm.engine.plugins.active("speculator")
    original, out = spec.propose, []

    def propose(requests, max_tokens):
        drafts = original(requests, max_tokens)
        out.append(take(spec))
        return drafts

    spec.propose = propose
    llm.engine.plugins.unregister(spec)
    llm.engine.plugins.register(spec)
    return out


def test_batched_drafting_gives_each_request_its_own_drafts(case, eagle_case):
    """The head drafts for all requests in one forward per step: each request's drafts (by
    context) equal those it gets when it runs alone, so no request's features, KV or draft
    ids leak into another's."""
    model_dir, prompts, _ = case
    options = {"eagle": {"model_path": str(eagle_case[0])}}

    def drafts_by_context(batches):
        with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
                 plugin_options=options, speculative_min_accept_rate=0.0) as llm:  # fmt: skip
            seen, sizes = record_drafts(llm)
            for batch in batches:
                llm.generate(batch, SamplingParams(max_tokens=12, temperature=0.0))
        return seen, sizes

    together, sizes = drafts_by_context([prompts])
    assert max(sizes) >= 3  # several requests drafted in one call
    alone, _ = drafts_by_context([[p] for p in prompts])
    common = together.keys() & alone.keys()
    assert len(common) >= len(prompts)
    assert {c: together[c] for c in common} == {c: alone[c] for c in common}


def test_features_of_requests_that_pause_drafting_are_merged_losslessly(case, eagle_case,
                                                                         monkeypatch):  # fmt: skip
    """While the switch keeps drafting off, each request's target features pile up one block
    a step (views into the step's gathered rows); every `COMPACT_AFTER` they are merged into
    one. The head then sees exactly what it sees unmerged: same keys after every propose."""
    from pegboard.core.speculative import hidden

    model_dir, prompts, reference = case
    options = {"eagle": {"model_path": str(eagle_case[0]), "kv_cache_tokens": 2048}}

    def run():
        with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
                 plugin_options=options) as llm:  # fmt: skip
            keys = snapshot_after_propose(llm, lambda spec: spec.kv.pool.k[0].clone())
            outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0.0))
            assert llm.engine.speculation.switch.num_off_steps >= 16  # a pause happened
            return [o.token_ids for o in outs], keys

    merged, keys = run()
    monkeypatch.setattr(hidden, "COMPACT_AFTER", 10**6)
    apart, apart_keys = run()
    assert merged == apart
    assert len(keys) == len(apart_keys)
    for a, b in zip(keys, apart_keys):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    # Handed out at once, step by step, instead of logged and handed out as runs of decode
    # steps (`LOG_STEPS`): the head sees the same.
    monkeypatch.setattr(hidden, "LOG_STEPS", 1)
    at_once, at_once_keys = run()
    assert at_once == merged
    assert len(at_once_keys) == len(keys)
    for a, b in zip(keys, at_once_keys):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_steps_without_drafts_are_logged_and_handed_out_as_runs(case, eagle_case, monkeypatch):
    """While drafting is off, each step's features are copied in one piece and logged; a run
    of decode steps over the same requests reaches each request as one block."""
    from pegboard.core.speculative import hidden

    model_dir, prompts, _ = case
    options = {"eagle": {"model_path": str(eagle_case[0])}}
    runs: list[int] = []
    stack = torch.stack

    def spy(tensors, dim=0):
        runs.append(len(tensors))
        return stack(tensors, dim=dim)

    monkeypatch.setattr(hidden.torch, "stack", spy)
    with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
             plugin_options=options, speculative_disable_by_batch_size=1) as llm:  # fmt: skip
        llm.generate(prompts[:3], SamplingParams(max_tokens=40, temperature=0.0))
        assert llm.engine.speculation.switch.num_off_steps >= 30  # never drafted
    assert runs and max(runs) == hidden.LOG_STEPS


def test_ingest_pairs_each_feature_with_the_token_after_it():
    """`_ingest` hands the head, per new target position t, the feature at t and token t + 1
    (EAGLE's pairs): from the first position the head has not seen, across the logged blocks,
    up to the last token's position (its next token is not sampled yet). A wrong pairing only
    lowers acceptance, so the lossless tests cannot see it."""
    import types

    from pegboard.core.speculative.hidden import FEATURES_KEY
    from pegboard.plugins.speculative.eagle import STATE_KEY, EagleSpeculator
    from pegboard.plugins.speculative.head_kv import HeadSlot
    from pegboard.sdk.types import Request

    request = Request(list(range(100, 110)), SamplingParams(max_tokens=8))
    request.token_ids += [110, 111, 112]  # 13 tokens: pairs exist for positions 0-11
    features = torch.arange(14.0).unsqueeze(1)  # the feature at position t is t
    request.plugin_state[FEATURES_KEY] = [(0, features[:8]), (8, features[8:])]
    slot = request.plugin_state[STATE_KEY] = HeadSlot()
    slot.next_position = 5  # the head has seen the pairs of positions 0-4
    spec = EagleSpeculator.__new__(EagleSpeculator)
    spec._tracked = {}
    spec.kv = types.SimpleNamespace(reserve=lambda slot, n: True)
    job = spec._ingest(0, request, extra=0)
    assert job.positions == list(range(5, 12))
    assert job.ids == [request.token_ids[t + 1] for t in range(5, 12)] == list(range(106, 113))
    assert job.feats.squeeze(1).tolist() == [float(t) for t in range(5, 12)]
    assert FEATURES_KEY not in request.plugin_state  # consumed
