"""The LM head inside the decode CUDA graphs (`pegboard.core.cuda_graph`): a decode replay
writes every row's logits (in the model's dtype) into one static buffer, so the model runner runs no LM head
after it; graphs of more rows than `LOGITS_MAX_BYTES` holds leave it to the runner.

On CPU the graph runner's bookkeeping runs with "graphs" that replay the model (and the LM
head) eagerly into the static buffers, through the Triton backend in its CPU interpreter
(`test_speculative_graphs.eager_graphs`); on a GPU (`gpu`) real graphs give the eager path's
tokens and logprobs."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures.devices import GPU_ENGINE
from pegboard.core import cuda_graph, model_runner
from pegboard.core.llm import LLM
from pegboard.core.models.llama import CausalLM
from pegboard.sdk.types import SamplingParams
from test_speculative_graphs import EagerGraphRunner, eager_graphs  # noqa: F401  (a fixture)

#: As many as the largest graph's rows: a padded row makes row 0 NaN in the CPU interpreter's
#: eagerly replayed "graphs" (not on a GPU: tests/test_cuda_graph.py pads 3 to 4 there).
PROMPTS = [[5, 9, 13, 17], [4, 8], [21, 3, 30, 7, 11, 2], [40, 41, 42]]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=2)


def _generate(model_dir, **settings):
    """Greedy outputs, the graph runner, and the rows of each LM head the model runner ran
    itself (not inside a graph)."""
    base = dict(dtype="float32", device="cpu", attention="triton", cuda_graph_max_bs=4)
    with LLM(str(model_dir), **(base | settings)) as llm:
        model, eager_rows = llm.engine.runner.model, []
        compute_logits = model.compute_logits

        def counted(hidden, out=None):
            if out is None:
                eager_rows.append(hidden.shape[0])
            return compute_logits(hidden, out=out)

        model.compute_logits = counted
        outs = llm.generate(PROMPTS, PARAMS)
        return outs, llm.engine.runner.cuda_graphs, eager_rows


def _same(outs, reference):
    assert [o.token_ids for o in outs] == [o.token_ids for o in reference]
    for o, r in zip(outs, reference):
        for got, want in zip(o.logprobs, r.logprobs):
            assert got.token_id == want.token_id
            assert got.logprob == pytest.approx(want.logprob, abs=1e-5)


@pytest.fixture
def reference(tiny_llama_dir):
    outs, graphs, _ = _generate(tiny_llama_dir, disable_cuda_graph=True)
    assert graphs is None
    return outs


def test_decode_replays_return_the_graphs_logits(tiny_llama_dir, eager_graphs, reference):  # noqa: F811
    outs, graphs, eager_rows = _generate(tiny_llama_dir)
    assert graphs.num_replays >= PARAMS.max_tokens - 1
    assert graphs.logits_max_size == graphs.max_batch_size == 4
    assert eager_rows == [len(PROMPTS)]  # the prefill step's only: decode replays ran none
    _same(outs, reference)


def test_graphs_beyond_the_logits_cap_leave_the_lm_head_to_the_runner(
    tiny_llama_dir,
    eager_graphs,  # noqa: F811
    reference,
    monkeypatch,
):
    vocab = json.loads((tiny_llama_dir / "config.json").read_text())["vocab_size"]
    monkeypatch.setattr(cuda_graph, "LOGITS_MAX_BYTES", 2 * vocab * 4)  # rows of 2 at most
    outs, graphs, eager_rows = _generate(tiny_llama_dir)
    assert graphs.logits_max_size == 2 and graphs.logits_buffer.shape == (2, vocab)
    assert graphs.logits is None  # the last replay: the graph of 4 rows
    # the prefill, then each decode step's (with overlap, one more: computed and dropped)
    assert len(eager_rows) >= PARAMS.max_tokens and set(eager_rows) == {4}
    _same(outs, reference)


class WarmingGraphRunner(EagerGraphRunner):
    """Runs each shape once at capture, as the real runner's warm-up does."""

    def _capture(self, rows: int, with_logits: bool):
        self._run(rows, with_logits=with_logits)
        return super()._capture(rows, with_logits)


def test_an_lm_head_that_cannot_be_captured_leaves_it_out_of_the_graphs(
    tiny_llama_dir,
    eager_graphs,  # noqa: F811
    reference,
    monkeypatch,
):
    compute_logits = CausalLM.compute_logits

    def uncapturable(self, hidden, out=None):
        if out is not None:
            raise RuntimeError("this LM head cannot run in a graph")
        return compute_logits(self, hidden)

    monkeypatch.setattr(CausalLM, "compute_logits", uncapturable)
    monkeypatch.setattr(model_runner, "CUDAGraphRunner", WarmingGraphRunner)
    outs, graphs, eager_rows = _generate(tiny_llama_dir)
    assert graphs is not None and graphs.logits_max_size == 0 and graphs.num_replays > 0
    assert len(eager_rows) >= PARAMS.max_tokens  # the runner ran every LM head
    _same(outs, reference)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gpu_lm_head_in_the_decode_graph_gives_eager_tokens_and_logprobs(tiny_llama_dir, dtype):
    # the prompts' 15 tokens prefill in the mixed graph of 16; the detokenizer inline
    settings = GPU_ENGINE | dict(dtype=dtype, cuda_graph_max_bs=8, cuda_graph_mixed_max_tokens=16)
    eager, none, _ = _generate(tiny_llama_dir, disable_cuda_graph=True, **settings)
    outs, graphs, eager_rows = _generate(tiny_llama_dir, **settings)
    assert none is None and graphs is not None
    # the buffer holds the LM head's own output: the model's dtype (the engine converts for a
    # sampler that wants float32, the standard one takes it as it is)
    assert graphs.logits_max_size == 8 and graphs.logits_buffer.dtype == getattr(torch, dtype)
    assert eager_rows == [len(PROMPTS)]
    if dtype == "float32":
        _same(outs, eager)
    else:  # bf16: the same kernels, graphed or not
        assert [o.token_ids for o in outs] == [o.token_ids for o in eager]
