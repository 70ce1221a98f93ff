"""A KV cache smaller than one full-context request: the engine serves a shorter context and
says so (the log, `/v1/models`, a 400 for longer requests), or refuses to start when the longer
context was asked for — it never cuts outputs short silently."""

from __future__ import annotations

import openai
import pytest
from pegboard.core.context_fit import KVCapacityError
from pegboard.core.engine import RequestRejected
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams
from test_server_process import ServerProcess

MODEL_CONTEXT = 512  # the tiny fixtures' max_position_embeddings
KV_TOKENS = 128


def test_a_small_cache_lowers_the_served_context(tiny_llama_dir, caplog):
    with caplog.at_level("WARNING", logger="pegboard.engine"):
        llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_tokens=KV_TOKENS)
    with llm:
        assert llm.engine.info.max_model_len == KV_TOKENS
        assert f"serving a context of {KV_TOKENS} tokens" in caplog.text
        with pytest.raises(RequestRejected, match=f"context length is {KV_TOKENS}"):
            llm.generate([[5] * (KV_TOKENS + 10)], SamplingParams(max_tokens=4))
        out = llm.generate([[5] * 100], SamplingParams(max_tokens=4, ignore_eos=True))[0]
        assert len(out.token_ids) == 4


def test_an_asked_for_context_the_cache_cannot_hold_refuses_to_start(tiny_llama_dir):
    with pytest.raises(KVCapacityError, match="--max-model-len 256 needs room for 256 tokens"):
        LLM(str(tiny_llama_dir), dtype="float32", device="cpu", kv_cache_tokens=KV_TOKENS,
            max_model_len=256)  # fmt: skip


@pytest.mark.slow
def test_models_endpoint_reports_the_served_context(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--served-model-name", "tiny", "--skip-warmup",
        "--kv-cache-tokens", str(KV_TOKENS),
    ).wait_ready()  # fmt: skip
    try:
        client = server.client()
        assert client.models.list().data[0].model_extra["max_model_len"] == KV_TOKENS
        with pytest.raises(openai.BadRequestError, match=f"maximum context length is {KV_TOKENS}"):
            client.completions.create(model="tiny", prompt="hello", max_tokens=KV_TOKENS)
    finally:
        assert server.stop() == 0, server.log()
