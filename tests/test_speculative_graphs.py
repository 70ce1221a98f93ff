"""CUDA graphs under speculative decoding (`pegboard.core.cuda_graph`): verify steps replay
graphs of (batch size, k + 1) rows, requests with fewer drafts padded at their end; the
target's hidden states an EAGLE head reads come back from replays too, so decode graphs stay
on with `eagle`.

On CPU the graph runner's bookkeeping (padding, the backend prepared for the padded layout,
rows and features mapped back) runs with "graphs" that replay the model eagerly into the
static buffers, through the Triton backend in its CPU interpreter; on a GPU (`gpu`) real
graphs give the eager path's tokens."""

from __future__ import annotations

import dataclasses
import os

import pydantic
import pytest
import test_speculative
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core import model_runner
from pegboard.core.cuda_graph import CUDAGraphRunner
from pegboard.core.llm import LLM
from pegboard.core.speculative.step import verify_lens
from pegboard.sdk.types import SamplingParams
from test_speculative import MAX_NEW, OracleSpeculator, assert_same, oracle_plugins
from test_speculative_device_drafts import DeviceOracle, device_oracle
from test_speculative_eagle import record_drafts, snapshot_after_propose

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

case = test_speculative.case


class GraphOracle(OracleSpeculator):
    """The oracle (every third draft wrong) with a chain length the engine can capture."""

    name = "graph_oracle"

    class Options(pydantic.BaseModel):
        num_draft_tokens: int = 4

    def propose(self, requests, max_tokens):
        return super().propose(
            requests, [min(k, self.options.num_draft_tokens) for k in max_tokens]
        )


class GraphDeviceOracle(DeviceOracle):
    """`GraphOracle`'s chains as device tensors (`test_speculative_device_drafts`)."""

    name = "graph_oracle_device"
    Options = GraphOracle.Options

    def propose(self, requests, max_tokens):
        k = self.options.num_draft_tokens
        return super().propose(requests, [min(m, k) for m in max_tokens])


def graph_oracle_plugins(prompts, reference):
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, wrong_every=3)
    pm.add(GraphOracle)
    return pm


class _EagerReplay:
    """Stands in for a captured graph on CPU: the model over the runner's static rows."""

    def __init__(self, runner: CUDAGraphRunner, rows: int, with_logits: bool) -> None:
        self.runner, self.rows, self.with_logits = runner, rows, with_logits

    def replay(self) -> None:
        # A captured graph reads the static slots whatever batch `prepare` saw (a decode
        # replay prepares the backend with the real batch's, which has no padded rows).
        backend = self.runner.attention
        backend.batch = dataclasses.replace(
            backend.batch, slot_mapping=self.runner.slot_mapping[: self.rows]
        )
        self.runner._run(self.rows, into_static=True, with_logits=self.with_logits)


class EagerGraphRunner(CUDAGraphRunner):
    def _capture(self, rows: int, with_logits: bool):
        return _EagerReplay(self, rows, with_logits)


@pytest.fixture
def eager_graphs(monkeypatch):
    """Graph runners whose graphs replay eagerly, allowed on CPU."""
    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setattr(model_runner, "CUDAGraphRunner", EagerGraphRunner)
    monkeypatch.setattr(model_runner, "graph_unsupported_reason", lambda device, backend: None)


def _run(model_dir, prompts, plugins=None, **settings):
    """Outputs, speculation stats, the graph runner and the drafts by context."""
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    base = dict(dtype="float32", device="cpu", attention="triton", cuda_graph_max_bs=4)
    with LLM(str(model_dir), plugins=plugins, **(base | settings)) as llm:
        drafts, _ = record_drafts(llm)
        outs = llm.generate(prompts, params)
        return outs, llm.engine.speculation.stats(), llm.engine.runner.cuda_graphs, drafts


def test_verify_graphs_are_captured_for_a_chains_length_plus_one():
    from pegboard.plugins.speculative.ngram import NgramOptions, NgramSpeculator

    assert verify_lens(NgramSpeculator(NgramOptions(num_draft_tokens=4))) == [5]
    assert verify_lens(NgramSpeculator(NgramOptions(num_draft_tokens=4, topk=2))) == []  # trees
    assert verify_lens(OracleSpeculator()) == []  # no known chain length
    assert verify_lens(GraphOracle()) == [5]


@pytest.mark.slow
def test_padded_verify_replays_equal_transformers(case, eager_graphs):
    """Chains cut mid-way, requests drafting fewer tokens near their end and plain decodes
    in one batch: replayed through the padded verify layout, still transformers' tokens."""
    model_dir, prompts, reference = case
    prompts, reference = prompts[:3], reference[:3]
    pm = graph_oracle_plugins(prompts, reference)
    outs, stats, graphs, _ = _run(model_dir, prompts, pm, speculator="graph_oracle")
    assert_same(outs, reference)
    assert graphs.query_lens == (5,)
    assert graphs.num_verify_replays >= 5
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_draft_tokens"]


@pytest.mark.slow
@pytest.mark.parametrize("mix", [False, True], ids=["device", "mixed"])
def test_padded_verify_replays_of_device_drafts_equal_transformers(case, eager_graphs, mix):
    """Oracle chains as device tensors (`mix`: beside host drafts, no drafts and shorter
    chains), their ids written into the verify graph's inputs: transformers' tokens."""
    model_dir, prompts, reference = case
    pm = device_oracle(case, 3, GraphDeviceOracle, mix=mix)
    outs, stats, graphs, _ = _run(model_dir, prompts[:3], pm, speculator="graph_oracle_device")
    assert_same(outs, reference[:3])
    assert graphs.num_verify_replays >= 5 and stats["spec_accepted_tokens"] > 0


@pytest.mark.slow
def test_eagle_features_from_replays_give_the_eager_drafts(case, eager_graphs, tmp_path):
    """Decode and verify steps replayed with an EAGLE-3 head: it gets the same target hidden
    states as eagerly, so after every `propose` its keys (computed from them) and its drafts
    are the eager run's."""
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, reference = case
    prompts, reference = prompts[:2], reference[:2]
    head = build_eagle3_head(tmp_path / "h", attention_heavy=True)
    options = {"eagle": {"model_path": str(head), "num_draft_tokens": 3, "kv_cache_tokens": 1024}}
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)

    def run(**settings):
        with LLM(str(model_dir), dtype="float32", device="cpu", attention="triton",
                 cuda_graph_max_bs=4, speculator="eagle", plugin_options=options,
                 **settings) as llm:  # fmt: skip
            drafts, _ = record_drafts(llm)
            keys = snapshot_after_propose(llm, lambda spec: spec.kv.pool.k[0].clone())
            outs = llm.generate(prompts, params)
            return outs, drafts, keys, llm.engine.runner.cuda_graphs

    outs, drafts, keys, graphs = run()
    assert_same(outs, reference)
    assert graphs.features_fn is not None and graphs.num_replays > graphs.num_verify_replays > 0
    _, eager, eager_keys, none = run(disable_cuda_graph=True)
    assert none is None
    assert drafts == eager and len(keys) == len(eager_keys)
    for k, e in zip(keys, eager_keys):
        torch.testing.assert_close(k, e, atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ GPU: real graphs


def _gpu(model_dir, prompts, plugins=None, **settings):
    """Greedy tokens, speculation stats, the target's graph runner (None: off) and the
    speculator."""
    # the detokenizer inline (GPU_ENGINE in tests/fixtures/devices.py); mixed graphs of up to
    # 256 tokens: `case`'s 6 prompts (116 tokens) prefill in one of them
    base = GPU_ENGINE | dict(dtype="float32", attention="triton", page_size=4,
                             kv_cache_tokens=4096, cuda_graph_max_bs=8,
                             cuda_graph_mixed_max_tokens=256)  # fmt: skip
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    with LLM(str(model_dir), plugins=plugins, **(base | settings)) as llm:
        outs = llm.generate(prompts, params)
        e = llm.engine
        graphs = e.runner.cuda_graphs
        return [o.token_ids for o in outs], e.speculation.stats(), graphs, e.speculation.speculator


@pytest.mark.gpu
@pytest.mark.parametrize("tree", [False, True], ids=["chain", "tree"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_gpu_graph_verify_equals_eager_verify(case, n, tree):
    """Oracle chains, or oracle trees through the tree verify graphs
    (`test_speculative_tree_graphs`)."""
    model_dir, prompts, reference = case
    prompts, reference = prompts[:n], reference[:n]
    if tree:
        from test_speculative_tree_graphs import graph_tree_plugins as plugins

        name, replays = "graph_tree_oracle", "num_tree_replays"
    else:
        plugins, name, replays = graph_oracle_plugins, "graph_oracle", "num_verify_replays"
    graphed, stats, graphs, _ = _gpu(model_dir, prompts, plugins(prompts, reference),
                                     speculator=name)  # fmt: skip
    assert graphs is not None and getattr(graphs, replays) > 0
    eager, eager_stats, none, _ = _gpu(model_dir, prompts, plugins(prompts, reference),
                                       speculator=name, disable_cuda_graph=True)  # fmt: skip
    assert none is None
    assert graphed == eager == reference
    assert stats["spec_accepted_tokens"] == eager_stats["spec_accepted_tokens"]


@pytest.mark.gpu
def test_gpu_graph_verify_with_ngram_and_a_target_as_its_own_draft(case):
    model_dir, prompts, reference = case
    ngram, _, graphs, _ = _gpu(model_dir, prompts, speculator="ngram")
    assert graphs.num_verify_replays > 0
    assert ngram == reference
    options = {"draft": {"model_path": str(model_dir), "num_draft_tokens": 4}}
    perfect, stats, graphs, draft = _gpu(model_dir, prompts, speculator="draft",
                                         plugin_options=options)  # fmt: skip
    assert perfect == reference
    assert stats["spec_accepted_tokens"] == stats["spec_draft_tokens"] > 0
    assert graphs.num_verify_replays > 0
    assert draft.runner.cuda_graphs.num_replays > 0  # the draft model's own decode graphs


@pytest.mark.gpu
def test_gpu_eagle_graphs_draft_and_verify_as_eagerly(case, tmp_path):
    """Decode, verify and draft-chain graphs with an EAGLE-3 head: the same drafts (so the
    same features reached the head) and tokens as without graphs."""
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, reference = case
    options = {
        "eagle": {"model_path": str(build_eagle3_head(tmp_path / "h", attention_heavy=True))}
    }
    graphed, stats, graphs, head = _gpu(model_dir, prompts, speculator="eagle",
                                        plugin_options=options)  # fmt: skip
    assert graphs is not None and graphs.num_replays > graphs.num_verify_replays > 0
    assert head.graphs is not None and head.graphs.num_replays > 0
    eager, eager_stats, _, _ = _gpu(model_dir, prompts, speculator="eagle", plugin_options=options,
                                    disable_cuda_graph=True)  # fmt: skip
    assert graphed == eager == reference
    assert stats["spec_accepted_tokens"] == eager_stats["spec_accepted_tokens"]
    assert stats["spec_draft_tokens"] == eager_stats["spec_draft_tokens"]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [1, 6])
def test_gpu_eagle_device_drafts_equal_host_drafts(case, tmp_path, monkeypatch, n):
    """EAGLE-3 chains handed to the core on the device (the default) through the drafting
    and verify graphs: the tokens and acceptance of the same chains read in `propose`
    (`device_drafts` off), and `read_drafts` is never called."""
    from pegboard.plugins.speculative.eagle import EagleSpeculator
    from test_speculative_eagle import build_eagle3_head

    model_dir, prompts, reference = case
    head = str(build_eagle3_head(tmp_path / "h", attention_heavy=True))
    reads, read = [], EagleSpeculator.read_drafts
    monkeypatch.setattr(
        EagleSpeculator, "read_drafts", staticmethod(lambda d: reads.append(1) or read(d))
    )
    runs = {}
    for on_device in (True, False):
        options = {"eagle": {"model_path": head, "device_drafts": on_device}}
        before = len(reads)
        tokens, stats, graphs, spec = _gpu(model_dir, prompts[:n], speculator="eagle",
                                           plugin_options=options)  # fmt: skip
        assert graphs.num_verify_replays > 0 and spec.graphs.num_replays > 0
        assert (len(reads) == before) == on_device
        runs[on_device] = (tokens, stats)
    assert runs[True] == runs[False]
    assert runs[True][0] == reference[:n]


@pytest.mark.gpu
@pytest.mark.parametrize("mix", [False, True], ids=["device", "mixed"])
@pytest.mark.parametrize("n", [1, 3, 6])
def test_gpu_oracle_device_drafts_through_verify_graphs(case, n, mix):
    """Oracle chains as CUDA tensors (every third draft wrong; `mix`: beside host drafts, no
    drafts and shorter chains) through the verify graphs: transformers' tokens and the
    acceptance of the same chains as host lists."""
    model_dir, prompts, reference = case
    pm = device_oracle(case, 3, GraphDeviceOracle, mix=mix, device="cuda")
    tokens, stats, graphs, _ = _gpu(model_dir, prompts[:n], pm, speculator="graph_oracle_device")
    assert tokens == reference[:n]
    assert graphs.num_verify_replays > 0 and stats["spec_accepted_tokens"] > 0
    if not mix:
        host = graph_oracle_plugins(prompts, reference)
        host_tokens, host_stats, _, _ = _gpu(
            model_dir, prompts[:n], host, speculator="graph_oracle"
        )
        assert (tokens, stats) == (host_tokens, host_stats)


@pytest.mark.slow
def test_eagle_drafting_graphs_draft_as_eagerly(case, monkeypatch, tmp_path):
    """The head's catch-up forward and draft steps as one graph per batch size (replayed
    eagerly here, through Triton's interpreter): after every `propose` the head's keys (draft
    entries included, computed from each step's output) and the drafts equal the eager
    path's, over several requests with different numbers of new pairs, padded to a captured
    size."""
    from pegboard.plugins.speculative.head_graphs import DraftGraphs

    model_dir, prompts, reference = case
    prompts, reference = prompts[:3], reference[:3]
    options = eager_head_graphs(monkeypatch, DraftGraphs, tmp_path, num_draft_tokens=3)

    def run(**settings):
        with LLM(str(model_dir), dtype="float32", device="cpu", speculator="eagle",
                 plugin_options=options, cuda_graph_max_bs=4, speculative_min_accept_rate=0.0,
                 **settings) as llm:  # fmt: skip
            drafts, _ = record_drafts(llm)
            keys = snapshot_after_propose(llm, lambda spec: spec.kv.pool.k[0].clone())
            outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_NEW, temperature=0.0))
            return outs, drafts, keys, llm.engine.plugins.active("speculator").graphs

    outs, graphed, keys, graphs = run()
    assert_same(outs, reference)
    assert graphs is not None and graphs.sizes == [1, 2, 4] and graphs.num_replays >= 5
    _, eager, eager_keys, none = run(disable_cuda_graph=True)
    assert none is None
    assert graphed == eager
    assert len(keys) == len(eager_keys)
    for k, e in zip(keys, eager_keys):
        torch.testing.assert_close(k, e, atol=1e-4, rtol=1e-4)


def eager_head_graphs(monkeypatch, graphs_class, tmp_path, **options) -> dict:
    """An attention-heavy EAGLE-3 head's plugin options (Triton, `options`), its drafting
    graphs (`graphs_class`) allowed on CPU and replayed eagerly."""
    from pegboard.plugins.speculative import eagle
    from test_speculative_eagle import build_eagle3_head

    pytest.importorskip("triton", reason="triton is not installed")
    monkeypatch.setattr(eagle, "graphs_supported", lambda kv: True)
    monkeypatch.setattr(graphs_class, "_capture", lambda self, size: _EagerSteps(self, size))
    head = build_eagle3_head(tmp_path / "h", attention_heavy=True)
    return {"eagle": {"model_path": str(head), "attention": "triton", "kv_cache_tokens": 1024,
                      **options}}  # fmt: skip


class _EagerSteps:
    def __init__(self, graphs, size: int) -> None:
        self.graphs, self.size = graphs, size

    def replay(self) -> None:
        self.graphs._steps(self.size)


def test_triton_block_map_stays_put_for_verify_graphs():
    """After a capture with verify graphs the extend block map keeps its address: a longer
    eager batch gets a spare one; a new capture may grow it again."""
    from test_cuda_graph import _triton_backend

    backend = _triton_backend(max_model_len=256)
    backend.prepare_for_capture(4, max_query_len=5)
    block_map = backend.block_map
    backend.prepare(_extend_batch([5, 5, 3, 1]))
    assert backend.step_block_map is block_map and backend.num_blocks == 4
    backend.prepare(_extend_batch([200, 7]))  # a long prefill: more blocks than captured
    assert backend.block_map is block_map and backend.step_block_map is not block_map
    backend.prepare_for_capture(4, max_query_len=200)  # a new capture (graphs dropped)
    backend.prepare(_extend_batch([200, 7]))
    assert backend.step_block_map is backend.block_map


def _extend_batch(query_lens: list[int], page_size: int = 4):
    from pegboard.sdk.types import ForwardBatch, Request

    n, t = len(query_lens), sum(query_lens)
    return ForwardBatch(
        requests=[Request([1]) for _ in range(n)],
        input_ids=torch.zeros(t, dtype=torch.int64),
        positions=torch.zeros(t, dtype=torch.int64),
        slot_mapping=torch.full((t,), -1),
        query_lens_cpu=query_lens,
        seq_lens_cpu=[q + 3 for q in query_lens],
        page_tables_cpu=[list(range(-(-(q + 3) // page_size))) for q in query_lens],
        logits_indices=torch.arange(n),
        samples=[True] * n,
    )
