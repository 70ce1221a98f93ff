"""Which dtype the `sample` hook's logits come in (core/contract.py `PluginGuard.sample`).

The model runner hands back the LM head's logits in the model's dtype (no float32 copy of a
`[rows, vocab]` tensor per step). A sampler gets float32, as the hookspec says, unless its
class sets `logits_in_model_dtype = True` (the standard sampler does): then the model's
dtype, and the same tokens. Checked with a bfloat16 model on the CPU."""

from __future__ import annotations

import pytest
import torch
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.plugins.sampling.standard import StandardSampler
from pegboard.sdk.types import SamplingParams

GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=6, temperature=0.9, top_k=20, seed=3, ignore_eos=True)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13]]


class RecordingFloat(StandardSampler):
    """A sampler that keeps the hookspec's float32 (a third party's, say)."""

    name = "recording-float32"
    logits_in_model_dtype = False
    seen: set = set()

    def sample(self, logits, requests):
        type(self).seen.add(logits.dtype)
        return super().sample(logits, requests)


class RecordingModel(RecordingFloat):
    name = "recording-model-dtype"
    logits_in_model_dtype = True
    seen: set = set()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    pm = PluginManager()
    pm.add(RecordingFloat, distribution="pegboard")
    pm.add(RecordingModel, distribution="pegboard")
    llm = LLM(str(tiny_llama_dir), plugins=pm, dtype="bfloat16", device="cpu")
    yield llm
    llm.close()


def run(llm: LLM, sampler: str, params: SamplingParams) -> list[list[int]]:
    llm.swap("sampler", sampler)
    try:
        outs = llm.generate(PROMPTS, params)
    finally:
        llm.swap("sampler", "standard")
        llm.engine.step()
    assert all(o.error is None for o in outs), [o.error for o in outs]
    return [o.token_ids for o in outs]


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded-top-k"])
def test_float32_unless_the_sampler_takes_the_models_dtype(llm, params):
    RecordingFloat.seen, RecordingModel.seen = set(), set()
    as_float = run(llm, "recording-float32", params)
    as_model = run(llm, "recording-model-dtype", params)
    assert RecordingFloat.seen == {torch.float32}
    assert RecordingModel.seen == {torch.bfloat16}
    assert as_model == as_float  # the conversion is exact: the same tokens
