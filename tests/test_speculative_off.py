"""A step with drafting switched off is a plain step (issue 14: at batch 64 on the H200 a run
whose drafts were all rejected stayed 5 % below plain after the switch turned drafting off).

Compared step by step with an engine without a speculator on the same requests: the same
torch operations in the same order (so the same device work: on a GPU the same decode graph,
LM head inside, and the same sampler), the same host waits for the device (overlap kept), no
call of the speculator. The engines' steps line up one to one: a verify step whose drafts are
all rejected yields one token per request, as a plain step does."""

from __future__ import annotations

import pytest
import test_speculative
from pegboard.core.llm import LLM
from pegboard.core.overlap import PendingStep
from pegboard.sdk.types import Request, SamplingParams
from test_speculative import MAX_NEW, OracleSpeculator, oracle_plugins
from test_speculative_graphs import GraphOracle, eager_graphs  # noqa: F401 (a fixture)
from torch.utils._python_dispatch import TorchDispatchMode

case = test_speculative.case  # the module's fixture: tiny target, prompts, transformers' outputs


class _Ops(TorchDispatchMode):
    """Every aten operation dispatched while active, by name, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def _trace(case, plugins=None, **settings) -> list[dict]:
    """Per step of the case's prompts (greedy, batched): its aten ops, the host's waits for
    the device (`PendingStep.take`, the verify's `read_tokens`), whether it drafted and whether
    its tokens stayed on the device (overlap), and the speculator's calls."""
    model_dir, prompts, _ = case
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0)
    waits = [0]
    take = PendingStep.take

    def counted(self):
        waits[0] += 1
        return take(self)

    steps = []
    with LLM(str(model_dir), dtype="float32", device="cpu", plugins=plugins, **settings) as llm:
        e = llm.engine
        read = e.speculation.read_tokens

        def read_counted(tokens):
            waits[0] += 1
            return read(tokens)

        e.speculation.read_tokens = read_counted
        for p in prompts:
            e.add_request(Request(p, params))
        PendingStep.take = counted
        try:
            while e.has_work():
                waits[0], drafts, calls = 0, e.speculation.num_drafts, _calls()
                graphs = e.runner.cuda_graphs
                replays = _replays(graphs)
                with _Ops() as ops:
                    e.step()
                steps.append(
                    {
                        "ops": ops.ops,
                        "waits": waits[0],
                        "drafted": e.speculation.num_drafts > drafts,
                        "overlapped": e._pending is not None,
                        "asked": _calls() - calls,
                        # (decode graphs replayed, verify graphs replayed, LM head in the graph)
                        "graphs": tuple(b - a for a, b in zip(replays, _replays(graphs)))
                        + ((graphs.logits is not None,) if graphs is not None else ()),
                    }
                )
        finally:
            PendingStep.take = take
    return steps


def _calls() -> int:
    return OracleSpeculator.calls + GraphOracle.calls  # (`calls` counts per class)


def _replays(graphs) -> tuple[int, int]:
    if graphs is None:
        return (0, 0)
    return (graphs.num_replays - graphs.num_verify_replays, graphs.num_verify_replays)


GRAPHS = {"attention": "triton", "cuda_graph_max_bs": 8}  # (replayed eagerly on a CPU)


@pytest.mark.parametrize(
    "rule, graphs",
    [
        ("batch_size", False),
        ("accept_rate", False),
        pytest.param("accept_rate", True, marks=pytest.mark.slow),
    ],
)
def test_a_switched_off_step_is_a_plain_step(case, rule, graphs, request):
    """`batch_size`: the batch rule keeps drafting off from the first step; `accept_rate`: every
    draft is wrong, so the acceptance rule turns drafting off after a few verify steps (and
    probes later). Each step that neither drafts nor follows a step that drafted or read its
    tokens at once runs exactly the plain engine's step: its operations, its waits, overlap
    (but a flip, the last plain step before a verify, which reads its tokens at once)."""
    _, prompts, reference = case
    base = {}
    if graphs:  # decode graphs with the LM head inside, verify graphs (`GraphOracle`: k = 4)
        request.getfixturevalue("eager_graphs")
        base = dict(GRAPHS)
    plain = _trace(case, **base)
    settings = {"speculator": "graph_oracle" if graphs else "oracle", **base}
    settings["speculative_min_speedup"] = 1.0  # the speed rule's bookkeeping too
    if rule == "batch_size":
        settings["speculative_disable_by_batch_size"] = 1
    pm = oracle_plugins({tuple(p): ref for p, ref in zip(prompts, reference)}, 1)
    pm.add(GraphOracle)
    off = _trace(case, pm, **settings)
    assert len(off) == len(plain)
    compared = 0
    for i in range(1, len(off)):
        before, step = off[i - 1], off[i]
        if step["drafted"] or before["drafted"] or not before["overlapped"]:
            continue  # (a step after a verify or a flip takes its inputs from the host)
        if not step["overlapped"] and i < len(off) - 1:  # a flip: the next step drafts
            assert off[i + 1]["drafted"], (
                f"step {i}: read its tokens, yet step {i + 1} did not draft"
            )
            continue
        assert step["asked"] == 0, f"step {i}: the speculator was asked"
        assert step["ops"] == plain[i]["ops"], f"step {i}: other operations than plain"
        assert step["waits"] == plain[i]["waits"], f"step {i}: other host waits than plain"
        assert step["overlapped"] == plain[i]["overlapped"], f"step {i}: overlap differs"
        assert step["graphs"] == plain[i]["graphs"], f"step {i}: other graphs than plain"
        compared += 1
    assert compared >= MAX_NEW // 2  # most steps were switched off
    if rule == "accept_rate":
        assert any(s["drafted"] for s in off)  # the misses were verified first
    if graphs:
        assert any(s["graphs"][1] for s in off)  # ... in verify graphs
        assert all(s["graphs"][2] for s in plain[1:])  # every decode step: logits from a graph
