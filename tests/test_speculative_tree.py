"""Tree speculation is lossless (DESIGN.md §7): draft trees verified in one forward with the
torch backend's tree mask give, in float32 on CPU, the tokens of plain decoding (transformers'
`generate`) across batching, chunked prefill, preemption, prefix caches and swaps; the
accepted path's KV is moved into place; a perfect tree's first path is accepted whole."""

from __future__ import annotations

import collections
import os

import pytest
import test_speculative
import torch

if not torch.cuda.is_available():  # the Triton tests run in its CPU interpreter, set before import
    os.environ.setdefault("TRITON_INTERPRET", "1")
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative import tree as T
from pegboard.core.speculative.verify import accept_greedy
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, SamplingParams
from test_speculative import MAX_NEW, SETTINGS, assert_same, generate, generate_swapping

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs


class TreeOracle(Speculator):
    """Test speculator: a tree around the reference continuation. Per depth, a wrong sibling
    (with a child of its own holding the next reference token, which only a broken tree mask
    could make right) beside the reference token; the reference child comes first
    (`right_first`) or last (its path then needs KV compaction). `cut_at`: depths whose
    reference token is left out, so verification stops there."""

    name = "tree_oracle"
    reference: dict[tuple[int, ...], list[int]] = {}
    right_first = True
    cut_at: tuple[int, ...] = ()
    first_path_drafts = 0

    def propose(self, requests, max_tokens):
        out = []
        for r, k in zip(requests, max_tokens):
            ref = self.reference.get(tuple(r.prompt_token_ids), [])
            done = r.num_output_tokens
            tokens, parents = [], []
            parent = -1
            for depth, t in enumerate(ref[done : done + k]):
                group = [((t + 1) % 512, parent), (t, parent)]
                if self.right_first:
                    group.reverse()
                nxt = (ref[done + depth + 1 :] or [t])[0]
                if (done + depth) in self.cut_at:
                    group = [g for g in group if g[0] != t]
                start = len(tokens)
                for token, p in group:
                    tokens.append(token)
                    parents.append(p)
                    if token != t:  # the wrong sibling's own child
                        tokens.append(nxt)
                        parents.append(len(tokens) - 2)
                right = [start + i for i in range(len(tokens) - start) if tokens[start + i] == t]
                right = [i for i in right if parents[i] == parent]
                if not right:
                    break
                parent = right[0]
            tokens, parents = tokens[:k], parents[:k]
            type(self).first_path_drafts += len(T.first_path(parents))
            out.append(Drafts(tokens, parents=parents))
        return out


def tree_plugins(reference: dict, right_first: bool = True, cut_at=()) -> PluginManager:
    TreeOracle.reference = reference
    TreeOracle.right_first = right_first
    TreeOracle.cut_at = tuple(cut_at)
    TreeOracle.first_path_drafts = 0
    pm = PluginManager()
    pm.add(TreeOracle)
    return pm


# ---------------------------------------------------------------- tree shape and verification


def test_tree_shape_helpers():
    parents = [-1, -1, 0, 0, 2]
    assert T.depths(parents) == [1, 1, 2, 2, 3]
    assert T.children(parents) == [[0, 1], [2, 3], [], [4], [], []]
    assert T.first_path(parents) == [0, 2, 4]
    mask = T.ancestor_mask(parents)
    assert mask[4].tolist() == [True, False, True, False, True]
    assert mask[1].tolist() == [False, True, False, False, False]


def test_greedy_verification_follows_the_target_through_the_tree():
    # tokens: 0:5 1:6 (children of the last token), 2:7 3:8 (children of 0), 4:9 (child of 3)
    drafts = Drafts([5, 6, 7, 8, 9], parents=[-1, -1, 0, 0, 3])
    # argmax per node: root 5 -> node 1 (draft 0) 8 -> node 4 (draft 3) 9 -> node 5 (draft 4) 3
    target = [5, 8, 0, 0, 9, 3]
    v = accept_greedy(target, drafts)
    assert v.path == [0, 3, 4] and v.tokens == [5, 8, 9, 3]
    v = accept_greedy([6, 0, 1, 0, 0, 0], drafts)
    assert v.path == [1] and v.tokens == [6, 1]


# ---------------------------------------------------------------- end to end, greedy


def _tree_generate(case, settings, **oracle):
    model_dir, prompts, reference = case
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, **oracle)
    return generate(model_dir, prompts, pm, speculator="tree_oracle", attention="torch", **settings)


@pytest.mark.parametrize("settings", SETTINGS)
def test_tree_drafts_greedy_equal_transformers(case, settings):
    """The reference child comes last: every accepted path is compacted; a wrong sibling's
    child holds the next right token, which a mask that let it see its cousins would accept."""
    outs, stats = _tree_generate(case, settings, right_first=False, cut_at=range(3, MAX_NEW, 5))
    assert_same(outs, case[2])
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]
    assert stats["spec_accept_length"] > 1.5


def test_a_perfect_trees_first_path_is_accepted_whole(case):
    outs, stats = _tree_generate(case, {}, right_first=True)
    assert_same(outs, case[2])
    assert stats["spec_accepted_tokens"] == TreeOracle.first_path_drafts > 0
    assert stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]  # the siblings


def test_trees_on_a_backend_without_a_tree_mask_are_cut_to_their_first_path(case, caplog):
    """A backend without a tree mask (FlashInfer; here torch with its flag off): a tree is
    verified as its first path (logged)."""
    from pegboard.plugins.kernels import attention_torch

    model_dir, prompts, reference = case
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, right_first=True)
    orig = attention_torch.TorchAttentionBackend.supports_tree_mask
    attention_torch.TorchAttentionBackend.supports_tree_mask = False
    try:
        outs, stats = generate(model_dir, prompts, pm, speculator="tree_oracle")
    finally:
        attention_torch.TorchAttentionBackend.supports_tree_mask = orig
    assert_same(outs, reference)
    assert "no tree mask" in caplog.text
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0  # chains of it


def test_swapping_from_a_tree_speculator_mid_run_changes_no_token(case):
    model_dir, prompts, reference = case
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, right_first=False)
    with LLM(
        str(model_dir), dtype="float32", device="cpu", plugins=pm, speculator="tree_oracle",
        attention="torch",
    ) as llm:  # fmt: skip
        outputs, swapped = generate_swapping(llm, prompts, "ngram", topk=3, num_steps=3)
        assert swapped.result().active == "ngram"
        assert outputs == reference


def test_tree_mask_in_the_torch_backend_equals_each_path_run_alone():
    """Attention of a tree's tokens equals attention of each root-to-node path as a chain."""
    from test_attention_torch import Scenario

    cached, parents = 5, [-1, -1, 0, 1, 3]
    sc = Scenario([cached], [1 + len(parents)], page_size=4, seed=3)
    backend_cls = __import__(
        "pegboard.plugins.kernels.attention_torch", fromlist=["x"]
    ).TorchAttentionBackend
    backend = backend_cls(sc.info, sc.pool)
    sc.batch.tree_masks = [T.ancestor_mask(parents)]
    backend.prepare(sc.batch)
    k_new, v_new = sc.new_kv()
    out = backend.forward(0, sc.q, k_new, v_new)
    keys, values = sc.keys[0], sc.values[0]
    scale = sc.q.shape[-1] ** -0.5
    for i in range(len(parents)):
        node, seen = i, []
        while node >= 0:
            seen.append(cached + 1 + node)
            node = parents[node]
        idx = list(range(cached + 1)) + sorted(seen)
        k = keys[idx].repeat_interleave(2, dim=1)  # 4 heads over 2 KV heads
        v = values[idx].repeat_interleave(2, dim=1)
        q = sc.q[1 + i]
        w = torch.einsum("hd,nhd->hn", q, k).mul(scale).softmax(-1)
        expected = torch.einsum("hn,nhd->hd", w, v)
        torch.testing.assert_close(out[1 + i], expected, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- built-in tree speculators


def test_ngram_merges_the_latest_continuations_into_a_tree():
    from pegboard.plugins.speculative.ngram import NgramIndex, merge_tree

    context = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2, 6, 1, 2]
    index = NgramIndex(1, 2, keep=3)
    index.update(context)
    paths = index.continuations(context, 3)
    assert paths == [[6, 1, 2], [3, 5, 1], [3, 4, 1]]  # latest occurrence first
    tree = merge_tree(paths, 6)
    assert tree.tokens == [6, 1, 2, 3, 5, 1] and tree.parents == [-1, 0, 1, -1, 3, 4]
    assert T.first_path(tree.parents) == [0, 1, 2]


@pytest.mark.parametrize("settings", SETTINGS)
def test_ngram_tree_greedy_equals_transformers(case, settings):
    model_dir, prompts, reference = case
    options = {"ngram": {"topk": 3, "num_steps": 3, "num_draft_tokens": 8}}
    outs, stats = generate(
        model_dir, prompts, speculator="ngram", attention="torch", plugin_options=options,
        **settings,
    )  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0  # the tiny random model never repeats: all rejected


@pytest.mark.parametrize("settings", SETTINGS[:4])
def test_eagle3_tree_is_lossless(case, tmp_path_factory, settings):
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, reference = case
    head = build_eagle3_head(tmp_path_factory.mktemp("tree-eagle3"))
    options = {"eagle": {"model_path": str(head), "topk": 3, "num_steps": 3, "num_draft_tokens": 6}}
    outs, stats = generate(
        model_dir, prompts, speculator="eagle", attention="torch", plugin_options=options,
        **settings,
    )  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0


def test_eagle1_tree_is_lossless(case, tmp_path):
    from test_speculative_eagle import build_eagle1_head

    model_dir, prompts, reference = case
    options = {"eagle": {"model_path": str(build_eagle1_head(tmp_path / "h")), "topk": 2,
                         "num_steps": 4, "num_draft_tokens": 7}}  # fmt: skip
    outs, stats = generate(
        model_dir, prompts, speculator="eagle", attention="torch", plugin_options=options
    )
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0


def test_a_draft_tree_keeps_the_greedy_chain_and_the_best_nodes_parents_first():
    from pegboard.plugins.speculative.tree_search import DraftTree

    tree = DraftTree(topk=2)
    a, b = tree.add_children(-1, [-0.1, -2.0], [10, 11])  # a: the greedy token
    a1, a2 = tree.add_children(a, [-3.0, -3.5], [12, 13])  # unsure after a
    b1, b2 = tree.add_children(b, [-0.01, -5.0], [14, 15])  # sure after b: scores -2.01, -7
    assert tree.frontier([a1, a2, b1, b2]) == [a1, b1]  # a1 (greedy chain) despite its -3.1
    (a1x,) = tree.add_children(a1, [-0.2], [16])
    drafts = tree.drafts(4)  # greedy chain a, a1, a1x; then the best other node: b (-2.0)
    assert drafts.tokens == [10, 11, 12, 16] and drafts.parents == [-1, -1, 0, 2]
    assert T.first_path(drafts.parents) == [0, 2, 3]  # the greedy chain
    drafts = tree.drafts(5)  # then b1 (-2.01), before a1 at its depth
    assert drafts.tokens == [10, 11, 14, 12, 16] and drafts.parents == [-1, -1, 1, 0, 3]
    assert T.first_path(drafts.parents) == [0, 3, 4]


def test_target_as_its_own_tree_draft_accepts_the_whole_first_path(case):
    """The target drafts trees for itself: the greedy chain is each tree's first path, so
    every token of it is accepted (and none of the other branches)."""
    model_dir, prompts, reference = case
    options = {"draft": {"model_path": str(model_dir), "topk": 2, "num_steps": 3,
                         "num_draft_tokens": 5}}  # fmt: skip
    first_path = []
    from pegboard.plugins.speculative.draft import DraftModelSpeculator

    original = DraftModelSpeculator._propose_trees

    def spy(self, *args):
        out = original(self, *args)
        first_path.extend(len(T.first_path(d.parents)) for d in out if d.tokens)
        return out

    DraftModelSpeculator._propose_trees = spy
    try:
        outs, stats = generate(
            model_dir, prompts, speculator="draft", attention="torch", plugin_options=options
        )
    finally:
        DraftModelSpeculator._propose_trees = original
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] == sum(first_path) > 0
    assert stats["spec_draft_tokens"] > stats["spec_accepted_tokens"]


@pytest.mark.parametrize("settings", SETTINGS[:3])
def test_other_draft_model_trees_are_lossless(case, tmp_path_factory, settings):
    from fixtures import build_tiny_model

    model_dir, prompts, reference = case
    draft = build_tiny_model(tmp_path_factory.mktemp("draft"), "llama", seed=1, num_hidden_layers=1)
    options = {"draft": {"model_path": str(draft), "topk": 3, "num_steps": 3,
                         "num_draft_tokens": 7}}  # fmt: skip
    outs, stats = generate(
        model_dir, prompts, speculator="draft", attention="torch", plugin_options=options,
        **settings,
    )  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_draft_tokens"] > 0


# ---------------------------------------------------------------- sampling


def test_tree_rejection_sampling_matches_the_target_distribution():
    """Siblings tried one after another against the residual: a point-mass guess and two
    independent draws from `q` under the root, two point masses under the first draw. The
    first output token follows the root's `p0`, the second (after an accepted draft) `p1`."""
    from pegboard.core.speculative.verify import accept_sampled
    from test_speculative_sampling import CRITICAL_DF4, chi_square

    p0 = torch.tensor([0.4, 0.3, 0.1, 0.1, 0.1])
    p1 = torch.tensor([0.1, 0.2, 0.2, 0.2, 0.3])
    q = torch.tensor([0.1, 0.1, 0.6, 0.1, 0.1])
    target = torch.stack([p0, p1, p1, p1, p1, p1])  # row n: node n (0: the last token)
    eye = torch.eye(5)
    gen = torch.Generator().manual_seed(0)
    first, second = collections.Counter(), collections.Counter()
    accepted = 0
    for _ in range(12000):
        a, b = (int(torch.multinomial(q, 1, generator=gen)) for _ in range(2))
        drafts = Drafts([1, a, b, 0, 4], parents=[-1, -1, -1, 1, 1],
                        probs=torch.stack([eye[1], q, q, eye[0], eye[4]]))  # fmt: skip
        v = accept_sampled(target, drafts, gen)
        first[v.tokens[0]] += 1
        if v.path:
            second[v.tokens[1]] += 1
        accepted += len(v.path)
    assert chi_square(first, p0) < CRITICAL_DF4
    assert chi_square(second, p1) < CRITICAL_DF4
    assert accepted > 6000


def test_engine_sampling_with_tree_drafts_matches_plain_sampling(tiny_llama_dir):
    """End to end: 400 seeded requests at temperature 0.3 with tree drafts (the greedy
    continuation and a wrong sibling per depth, point masses) and without; the third output
    token has the same distribution (two-sample chi-square over the 6 most common tokens and
    the rest)."""
    from test_engine_parity import hf_reference

    prompt = [11, 12, 13, 14, 15, 16, 17, 18]
    greedy = hf_reference(tiny_llama_dir, [prompt], 3)[0][0]
    n = 400

    def third_tokens(plugins=None, **settings):
        params = [SamplingParams(max_tokens=3, temperature=0.3, seed=1000 * i) for i in range(n)]
        with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", plugins=plugins,
                 attention="torch", speculative_min_accept_rate=0.0, **settings) as llm:  # fmt: skip
            outs = llm.generate([prompt] * n, params)
            return collections.Counter(o.token_ids[2] for o in outs), llm.engine.speculation.stats()

    plain, _ = third_tokens()
    spec, stats = third_tokens(tree_plugins({tuple(prompt): greedy}), speculator="tree_oracle")
    assert stats["spec_accepted_tokens"] > n // 10
    top = [t for t, _ in (plain + spec).most_common(6)]
    bins = [(plain[t], spec[t]) for t in top]
    bins.append((n - sum(a for a, _ in bins), n - sum(b for _, b in bins)))
    stat = sum((a - b) ** 2 / (a + b) for a, b in bins if a + b)  # equal sample sizes
    assert stat < 22.46  # chi-square, 6 degrees of freedom, p = 0.001


def test_tree_speculators_conform(tiny_llama_dir):
    from pegboard.plugins.speculative.draft import DraftModelSpeculator
    from pegboard.plugins.speculative.ngram import NgramSpeculator
    from pegboard.sdk.testing import ConformanceError, check_speculator

    check_speculator(NgramSpeculator, {"topk": 3, "num_steps": 3, "num_draft_tokens": 7})
    options = {"model_path": str(tiny_llama_dir), "topk": 2, "num_steps": 3, "attention": "torch"}
    check_speculator(DraftModelSpeculator, options, vocab_size=512, rounds=15)

    class Orphans(Speculator):
        name = "orphans"

        def propose(self, requests, max_tokens):
            return [Drafts([1, 2], parents=[1, -1]) if k >= 2 else Drafts([]) for k in max_tokens]

    with pytest.raises(ConformanceError, match="parent's index"):
        check_speculator(Orphans)


def test_the_core_refuses_a_tree_with_a_parent_after_its_child():
    from pegboard.core.speculative.step import DraftViolation, check_drafts
    from pegboard.sdk.types import Request

    r = Request([1, 2, 3])
    with pytest.raises(DraftViolation, match="parent index"):
        check_drafts([Drafts([4, 5], parents=[1, -1])], [r], [2], 512)
    assert check_drafts([Drafts([4, 5], parents=[-1, -1])], [r], [2], 512)[0].parents == [-1, -1]


@pytest.mark.parametrize(
    "cached, new, trees",
    [
        pytest.param([7, 3], [6, 1], [[-1, -1, 0, 1, 3], None], id="small"),
        # 41 tree tokens span two query blocks (32 tokens each at GQA group 2): the second
        # block's shared phase holds tree keys too
        pytest.param(
            [5, 9, 2], [42, 4, 1], [[-1] + list(range(40)), [-1, -1, 0], None], id="two-blocks"
        ),
        # [n, m] masks reaching into the cached keys (a draft model's incremental tree)
        pytest.param([9, 12], [3, 5], [(3, 7), (4, 9)], id="over-cached-keys"),
    ],
)
def test_triton_extend_kernel_applies_the_tree_mask(cached, new, trees):
    """The Triton backend (CPU interpreter here, compiled on a GPU) equals the torch
    reference on batches with draft trees; the causal answer differs, so the mask is used."""
    import random

    from test_attention_triton import TorchAttentionBackend, TritonAttentionBackend, make_case, run

    rng = random.Random(0)
    masks = []
    gen = torch.Generator().manual_seed(1)
    for parents in trees:
        if parents is None:
            masks.append(None)
        elif isinstance(parents, tuple):  # a random causal [n, m] mask, each row seeing itself
            n, m = parents
            mask = torch.rand(n, m, generator=gen) < 0.5
            mask &= torch.ones(n, m, dtype=torch.bool).tril(m - n)  # no key after the row's own
            mask[torch.arange(n), m - n + torch.arange(n)] = True
            masks.append(mask)
        else:
            parents = [p if p < 0 else rng.randrange(-1, i) for i, p in enumerate(parents)]
            masks.append(T.ancestor_mask(parents))
    case = make_case(cached, new, page_size=4, seed=5)
    causal, _ = run(TorchAttentionBackend, case)
    case.batch.tree_masks = masks
    expected, _ = run(TorchAttentionBackend, case)
    out, _ = run(TritonAttentionBackend, case)
    torch.testing.assert_close(out.float(), expected.float(), atol=1e-4, rtol=0)
    assert not torch.allclose(causal, expected, atol=1e-3)


@pytest.mark.slow
def test_tree_drafts_through_the_triton_backend_equal_plain_decoding(case):
    """End to end with the Triton backend (its CPU interpreter here): the right child comes
    last, so the tree mask and the KV compaction both matter."""
    model_dir, prompts, reference = case
    prompts, reference = prompts[:2], reference[:2]
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, right_first=False)
    outs, stats = generate(model_dir, prompts, pm, speculator="tree_oracle", attention="triton")
    assert_same(outs, reference)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_tree_kv_compaction_in_an_fp8_pool(case):
    """FP8 KV (its bytes are moved): tree speculation equals plain decoding with the same pool."""
    model_dir, prompts, _ = case
    plain, _ = generate(model_dir, prompts, kv_cache_dtype="fp8_e4m3")
    reference = [o.token_ids for o in plain]
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, right_first=False)
    outs, stats = generate(
        model_dir, prompts, pm, speculator="tree_oracle", attention="torch",
        kv_cache_dtype="fp8_e4m3",
    )  # fmt: skip
    assert_same(outs, reference)
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


def test_radix_hits_on_tree_verified_kv_give_plain_outputs(case):
    """The radix cache keeps the pages of tree-verified tokens (their KV compacted into
    place); prompts that extend the first outputs hit them and still decode as plain."""
    model_dir, prompts, reference = case
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, right_first=False)
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    longer = [list(p) + ref[:9] for p, ref in zip(prompts, reference)]
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=pm, speculator="tree_oracle",
             attention="torch", kv_cache="radix", page_size=2) as llm:  # fmt: skip
        assert_same(llm.generate(prompts, params), reference)
        swapped = llm.swap("speculator", "ngram")  # the oracle knows only the first prompts
        again = llm.generate(longer, params)  # its first step applies the swap
        assert swapped.result().active == "ngram"
    assert all(o.num_cached_tokens >= len(p) for o, p in zip(again, prompts))
    plain, _ = generate(model_dir, longer)
    assert [o.token_ids for o in again] == [o.token_ids for o in plain]


def test_repeated_tree_shapes_reuse_their_masks_and_the_backend_writes_them_once(monkeypatch):
    """A speculator repeats a few tree shapes: the core keeps one ancestor mask and one padded
    mask per shape, and the Triton backend does not rewrite its fixed tree tensors when a
    step's masks are the ones already there (a copy fewer per tree verify step on a GPU)."""
    pytest.importorskip("triton", reason="triton is not installed")
    from pegboard.core.cuda_graph import padded_tree_masks
    from pegboard.plugins.kernels import attention_triton as A
    from pegboard.sdk.types import KVPool, ModelInfo
    from test_speculative_tree_graphs import _backend, _batch

    tree = T.ancestor_mask([-1, -1, 0])
    assert T.ancestor_mask([-1, -1, 0]) is tree
    masks = padded_tree_masks([tree, None], [4, 1], size=2, q=5)
    assert padded_tree_masks([tree, None], [4, 1], size=2, q=5) == masks  # the same objects
    info = ModelInfo(
        "LlamaForCausalLM", 1, 4, 2, 16, 64, 32, 64, torch.float32, torch.device("cpu")
    )
    backend = _backend(KVPool.allocate(info, num_pages=16, page_size=4), info, tree=4)
    real, writes = A._upload, []
    monkeypatch.setattr(A, "_upload", lambda dst, a: (writes.append(dst.data_ptr()), real(dst, a)))
    meta, bits = backend.tree_static
    other = padded_tree_masks([T.ancestor_mask([-1, 0, 0]), None], [4, 1], size=2, q=5)
    counts = []
    for step_masks in (masks, list(masks), other):  # the same masks again, then another tree
        batch = _batch([5, 5], [9, 6], [[0, 1, 2], [3, 4]], [-1] * 10, step_masks)
        backend.prepare(batch)
        counts.append(writes.count(meta.data_ptr()))
    assert counts == [1, 1, 2]
    m = other[0]
    assert bits[: m.numel()].tolist() == m.reshape(-1).to(torch.int8).tolist()
