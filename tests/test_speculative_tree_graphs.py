"""CUDA graphs of verify steps with draft trees (`pegboard.core.cuda_graph`): one per (batch
size, tree size + 1), each request's tree mask padded to the graph's layout and written into
the Triton backend's fixed tree tensors.

On CPU the padded layout runs through the Triton kernels in their interpreter: the backend
level (a padded tree batch attends as the unpadded one) and end to end with "graphs" that
replay the model eagerly into the static buffers; on a GPU (`gpu`) real tree graphs give the
eager path's tokens and acceptance."""

from __future__ import annotations

import os

import pydantic
import pytest
import test_speculative
import torch
from pegboard.core.cuda_graph import padded_tree_masks
from pegboard.core.speculative import tree as T
from pegboard.core.speculative.step import tree_verify_lens, verify_lens
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request
from test_speculative import assert_same
from test_speculative_graphs import _gpu, _run, eager_graphs  # noqa: F401 (a fixture)
from test_speculative_tree import TreeOracle, tree_plugins

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

case = test_speculative.case

TREE_SIZE = 6


class GraphTreeOracle(TreeOracle):
    """The tree oracle (a wrong sibling with its own child per depth, the right token last)
    with a tree size the engine can capture."""

    name = "graph_tree_oracle"

    class Options(pydantic.BaseModel):
        num_draft_tokens: int = TREE_SIZE
        topk: int = 2

    def propose(self, requests, max_tokens):
        return super().propose(requests, [min(k, TREE_SIZE) for k in max_tokens])


def graph_tree_plugins(prompts, reference):
    pm = tree_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, right_first=False)
    pm.add(GraphTreeOracle)
    return pm


def test_tree_verify_graphs_are_captured_for_a_trees_size_plus_one():
    from pegboard.plugins.speculative.ngram import NgramOptions, NgramSpeculator

    tree = NgramSpeculator(NgramOptions(num_draft_tokens=4, topk=2))
    chain = NgramSpeculator(NgramOptions(num_draft_tokens=4))
    assert (tree_verify_lens(tree), verify_lens(tree)) == ([5], [])
    assert (tree_verify_lens(chain), verify_lens(chain)) == ([], [5])
    assert tree_verify_lens(GraphTreeOracle()) == [TREE_SIZE + 1]


def test_padded_tree_masks_cover_each_requests_last_q_minus_1_rows():
    tree = T.ancestor_mask([-1, -1, 0])  # 3 tree tokens after the last token
    masks = padded_tree_masks([tree, None], [4, 1], size=4, q=6)
    assert masks[1:] == [None, None, None]
    full = masks[0]
    assert full.shape == (5, 5)
    assert torch.equal(full[:3, :3], tree)  # the tree's own bits top left
    assert not full[:3, 3:].any()  # no real row sees a padded one
    assert torch.equal(full[3:], torch.ones(5, 5, dtype=torch.bool).tril()[3:])  # padded: causal
    # A request with a real token before its tree (rows 1..): that column is visible.
    full = padded_tree_masks([tree], [5], size=1, q=6)[0]
    assert full[1:4, 0].all() and torch.equal(full[1:4, 1:4], tree)


# ------------------------------------------------------------------ the backend, padded


def _backend(pool, info, tree: int = 0):
    from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend

    backend = TritonAttentionBackend(info, pool, max_requests=2)
    if tree:
        backend.prepare_for_capture(4, max_query_len=tree + 1, max_tree=tree)
    return backend


def _batch(query_lens, seq_lens, tables, slots, masks, page_size=4) -> ForwardBatch:
    t = sum(query_lens)
    return ForwardBatch(
        requests=[Request([1]) for _ in query_lens],
        input_ids=torch.zeros(t, dtype=torch.int64),
        positions=torch.zeros(t, dtype=torch.int64),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        page_tables_cpu=tables,
        logits_indices=torch.arange(len(query_lens)),
        samples=[True] * len(query_lens),
        tree_masks=masks,
    )


def _slots(table, first, count, page_size=4):
    return [table[i // page_size] * page_size + i % page_size for i in range(first, first + count)]


def test_a_padded_tree_batch_attends_as_the_unpadded_one():
    """Two tree requests and a plain decode, as an eager extend and as the tree graph's layout
    (5 rows each, padded rows of slot -1, the masks in the backend's fixed tensors): the real
    rows' outputs agree; the fixed tensors keep their addresses across steps."""
    pytest.importorskip("triton", reason="triton is not installed")
    info = ModelInfo(
        architecture="LlamaForCausalLM", num_layers=1, num_heads=4, num_kv_heads=2,
        head_dim=16, hidden_size=64, vocab_size=32, max_model_len=64,
        dtype=torch.float32, device=torch.device("cpu"),
    )  # fmt: skip
    pool = KVPool.allocate(info, num_pages=16, page_size=4)
    gen = torch.Generator().manual_seed(0)
    pool.k[0].copy_(torch.randn(pool.k[0].shape, generator=gen))
    pool.v[0].copy_(torch.randn(pool.v[0].shape, generator=gen))
    trees = [T.ancestor_mask([-1, -1, 0]), T.ancestor_mask([-1, 0])]
    query_lens, seq_lens = [4, 3, 1], [9, 9, 7]
    tables = [[0, 1, 2], [3, 4, 5], [6, 7]]
    slots = [s for t, n, q in zip(tables, seq_lens, query_lens) for s in _slots(t, n - q, q)]
    q = torch.randn(8, 4, 16, generator=gen)
    k = torch.randn(8, 2, 16, generator=gen)
    v = torch.randn(8, 2, 16, generator=gen)

    eager = _backend(pool, info)
    eager.prepare(_batch(query_lens, seq_lens, tables, slots, trees + [None]))
    want = eager.forward(0, q, k, v)

    graph = _backend(pool, info, tree=4)
    static = graph.tree_static
    size, width = 4, 5
    dest = [i * width + j for i, n in enumerate(query_lens) for j in range(n)]
    padded_slots = torch.full((size * width,), -1, dtype=torch.int64)
    padded_slots[dest] = torch.tensor(slots)
    masks = padded_tree_masks(trees + [None], query_lens, size, width)
    batch = _batch([width] * size, [s - n + width for s, n in zip(seq_lens, query_lens)] + [5],
                   tables + [[0]], padded_slots.tolist(), masks)  # fmt: skip

    def padded(x):
        out = torch.randn(size * width, *x.shape[1:], generator=gen)
        out[dest] = x
        return out

    graph.prepare(batch)
    assert graph.tree is static and graph.tree_static is static
    got = graph.forward(0, padded(q), padded(k), padded(v))[dest]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    graph.prepare(_batch([1], [7], [[6, 7]], _slots([6, 7], 6, 1), [None]))
    assert graph.tree is static and not static[0].any()  # no tree: zero meta rows


# ------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_padded_tree_verify_replays_equal_transformers(case, eager_graphs):  # noqa: F811
    """Trees cut near each request's end, plain decodes and full trees in one batch, replayed
    through the padded tree layout: transformers' tokens, the right child last (its path's KV
    compacted), wrong siblings whose own child is right (a mask leak would accept it)."""
    model_dir, prompts, reference = case
    prompts, reference = prompts[:3], reference[:3]
    outs, stats, graphs, _ = _run(model_dir, prompts, graph_tree_plugins(prompts, reference),
                                  speculator="graph_tree_oracle")  # fmt: skip
    assert_same(outs, reference)
    assert graphs.tree_query_lens == (TREE_SIZE + 1,) and graphs.query_lens == ()
    assert graphs.num_tree_replays >= 5
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


# ------------------------------------------------------------------ GPU: real graphs
# (oracle trees: `test_speculative_graphs.test_gpu_graph_verify_equals_eager_verify`)


@pytest.fixture(scope="module")
def looping_case(tmp_path_factory):
    """A tiny target whose greedy outputs fall into short cycles of varied tokens (narrower
    random weights than `case`'s, which never repeat): n-gram trees, some branching, that the
    target accepts (on CPU: 33 of 94 draft tokens over `case`'s prompts), with transformers'
    outputs."""
    from fixtures import build_tiny_model
    from test_engine_parity import hf_reference
    from test_speculative import MAX_NEW, repetitive_prompts

    model_dir = build_tiny_model(tmp_path_factory.mktemp("looping"), "llama",
                                 initializer_range=0.1)  # fmt: skip
    prompts = repetitive_prompts(512)
    reference = [tokens for tokens, _ in hf_reference(model_dir, prompts, MAX_NEW)]
    return model_dir, prompts, reference


def test_ngram_trees_over_the_looping_target_are_accepted_and_lossless(looping_case):
    """The GPU test's workload on CPU: n-gram trees (some branching) are accepted, outputs
    are transformers'."""
    from test_speculative import generate

    model_dir, prompts, reference = looping_case
    outs, stats = generate(model_dir, prompts, speculator="ngram", page_size=4,
                           plugin_options={"ngram": {"topk": 3, "num_draft_tokens": 6}})  # fmt: skip
    assert_same(outs, reference)
    assert stats["spec_accepted_tokens"] > 10


@pytest.mark.gpu
@pytest.mark.parametrize("speculator", ["ngram", "draft"])
def test_gpu_tree_graphs_with_ngram_and_draft_model_trees(case, looping_case, speculator):
    """Real tree speculators: n-gram trees (over a target whose outputs repeat, so that
    drafts are accepted: `case`'s target accepts none) and the target as its own
    EAGLE-2-style tree draft (whose whole first path is accepted)."""
    model_dir, prompts, reference = looping_case if speculator == "ngram" else case
    options = {"ngram": {"topk": 3, "num_draft_tokens": 6},
               "draft": {"model_path": str(model_dir), "topk": 2, "num_steps": 3,
                         "num_draft_tokens": 5}}[speculator]  # fmt: skip
    plugin_options = {speculator: options}
    graphed, stats, graphs, _ = _gpu(model_dir, prompts, speculator=speculator,
                                     plugin_options=plugin_options)  # fmt: skip
    assert graphs.tree_query_lens == (options["num_draft_tokens"] + 1,)
    assert graphs.num_tree_replays > 0
    eager, eager_stats, _, _ = _gpu(model_dir, prompts, speculator=speculator,
                                    plugin_options=plugin_options, disable_cuda_graph=True)  # fmt: skip
    assert graphed == eager == reference
    assert stats["spec_accepted_tokens"] == eager_stats["spec_accepted_tokens"] > 0


# ------------------------------------------------------------------ EAGLE tree drafting graphs


@pytest.mark.slow
def test_eagle_tree_drafting_graphs_draft_as_eagerly(case, monkeypatch, tmp_path):
    """The head's catch-up forward and tree search (frontier choice, ancestor masks in the
    backends' fixed tree tensors) as one graph per batch size, replayed eagerly through
    Triton's interpreter: every `propose` gives the eager path's trees (tokens and parents),
    over requests with different numbers of new pairs and limits, padded to a captured size."""
    from pegboard.core.llm import LLM
    from pegboard.plugins.speculative.head_tree_graphs import TreeDraftGraphs
    from pegboard.sdk.types import SamplingParams
    from test_speculative import MAX_NEW
    from test_speculative_graphs import eager_head_graphs

    model_dir, prompts, reference = case
    prompts, reference = prompts[:3], reference[:3]
    options = eager_head_graphs(monkeypatch, TreeDraftGraphs, tmp_path, topk=2, num_steps=4,
                                num_draft_tokens=6)  # fmt: skip

    def run(**settings):
        with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
                 plugin_options=options, cuda_graph_max_bs=4, speculative_min_accept_rate=0.0,
                 **settings) as llm:  # fmt: skip
            spec = llm.engine.plugins.active("speculator")
            trees, original = [], spec.propose

            def propose(requests, max_tokens):
                out = original(requests, max_tokens)
                trees.append([(tuple(r.token_ids), k, d.tokens, d.parents)
                              for r, k, d in zip(requests, max_tokens, out)])  # fmt: skip
                return out

            spec.propose = propose
            llm.engine.plugins.unregister(spec)
            llm.engine.plugins.register(spec)
            outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
            return outs, trees, spec.tree_graphs

    outs, graphed, graphs = run()
    assert_same(outs, reference)
    assert graphs is not None and graphs.sizes == [1, 2, 4] and graphs.num_replays >= 5
    assert any(parents and not T.is_chain(parents) for call in graphed for *_, parents in call)
    _, eager, none = run(disable_cuda_graph=True)
    assert none is None
    assert graphed == eager


@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
def test_eagle_drafting_graph_captures_move_nothing_between_host_and_device(
    case, monkeypatch, tmp_path, tree
):
    """What the EAGLE drafting graphs capture (catch-up forward, draft steps, the tree search)
    runs on CPU under `HostTransfers`: no `torch.tensor` of host values, no `x[i] = scalar`
    (a host scalar copied to the device), no read back — each fails a CUDA capture (as
    `x[i] = 1` once did, which CPU tests could not see)."""
    from fixtures.graph_safety import HostTransfers
    from pegboard.core.llm import LLM
    from pegboard.plugins.speculative.head_graphs import DraftGraphs
    from pegboard.plugins.speculative.head_tree_graphs import TreeDraftGraphs
    from test_speculative_graphs import _EagerSteps, eager_head_graphs

    graphs_class = TreeDraftGraphs if tree else DraftGraphs
    tree_options = {"topk": 2, "num_steps": 3} if tree else {}
    options = eager_head_graphs(monkeypatch, graphs_class, tmp_path, num_draft_tokens=3,
                                **tree_options)  # fmt: skip
    found = []

    def capture(self, size):
        with HostTransfers() as mode:
            self._steps(size)
        found.extend(mode.found)
        return _EagerSteps(self, size)

    monkeypatch.setattr(graphs_class, "_capture", capture)
    with LLM(str(case[0]), dtype="float32", device="cpu", speculator="eagle",
             plugin_options=options, cuda_graph_max_bs=2) as llm:  # fmt: skip
        spec = llm.engine.plugins.active("speculator")
        graphs = spec.tree_graphs if tree else spec.graphs
    assert graphs is not None and graphs.sizes == [1, 2]
    assert found == []


@pytest.mark.gpu
def test_gpu_eagle_tree_graphs_draft_and_verify_as_eagerly(case, tmp_path):
    """Tree drafting graphs of an EAGLE-3 head and tree verify graphs of the target: the
    same tokens, drafts and acceptance as without graphs."""
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, reference = case
    head = build_eagle3_head(tmp_path / "h", attention_heavy=True)
    options = {"eagle": {"model_path": str(head), "topk": 2, "num_steps": 3,
                         "num_draft_tokens": 6}}  # fmt: skip
    graphed, stats, graphs, spec = _gpu(model_dir, prompts, speculator="eagle",
                                        plugin_options=options)  # fmt: skip
    assert spec.tree_graphs is not None and spec.tree_graphs.num_replays > 0
    assert graphs.tree_query_lens == (7,) and graphs.num_tree_replays > 0
    eager, eager_stats, _, _ = _gpu(model_dir, prompts, speculator="eagle",
                                    plugin_options=options, disable_cuda_graph=True)  # fmt: skip
    assert graphed == eager == reference
    assert stats["spec_draft_tokens"] == eager_stats["spec_draft_tokens"]
    assert stats["spec_accepted_tokens"] == eager_stats["spec_accepted_tokens"]
