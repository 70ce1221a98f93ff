"""`AsyncEngine.generate` (core/async_engine.py): a reader that falls behind gets the deltas it
missed as one (tokens, text and logprobs concatenated, in order, finished once);
`merged_outputs` closed early aborts its request."""

from __future__ import annotations

import asyncio

import pytest
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.config import EngineConfig
from pegboard.core.llm import LLM
from pegboard.core.server.generation import merged_outputs
from pegboard.sdk.types import Request, SamplingParams

PROMPT = [5, 9, 23, 7, 11]
PARAMS = dict(temperature=0.0, max_tokens=12, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    config = EngineConfig(model=str(tiny_llama_dir), dtype="float32", device="cpu")
    e = AsyncEngine.from_config(config)
    yield e
    e.shutdown()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32")
    try:
        return llm.generate([PROMPT], SamplingParams(**PARAMS))[0]
    finally:
        llm.close()


async def read_all(stream, pause: asyncio.Event | None = None) -> list:
    outs = []
    async for out in stream:
        outs.append(out)
        if pause is not None and len(outs) == 1:
            await pause.wait()  # fall behind: the engine runs on without this reader
    return outs


def test_a_reader_that_fell_behind_gets_one_delta_for_what_it_missed(engine, reference):
    async def run():
        request = Request(list(PROMPT), SamplingParams(**PARAMS))
        behind = asyncio.Event()
        reader = asyncio.create_task(read_all(engine.generate(request), behind))
        while request.request_id not in engine._streams:  # the reader's task started
            await asyncio.sleep(0.01)
        stream = engine._streams[request.request_id]
        while not (stream.pending and stream.pending[-1].finished):  # the engine finishes
            await asyncio.sleep(0.01)  # while the reader waits: every delta is queued
        behind.set()
        return await reader

    outs = asyncio.run(run())
    assert len(outs) == 2, [len(o.new_token_ids) for o in outs]  # the first, then the rest
    assert [o.finished for o in outs] == [False, True]
    tokens = [t for o in outs for t in o.new_token_ids]
    assert tokens == reference.token_ids and len(tokens) == 12
    assert "".join(o.text for o in outs) == reference.text
    assert len([lp for o in outs for lp in o.new_logprobs]) == 12
    assert outs[-1].finish_reason == reference.finish_reason


def test_closing_a_single_choice_stream_aborts_its_request(engine):
    async def run():
        params = SamplingParams(temperature=0.0, max_tokens=10_000, ignore_eos=True)
        request = Request(list(PROMPT), params)
        stream = merged_outputs(engine, [request])
        index, first = await anext(stream)
        await stream.aclose()  # the client went away
        while request.request_id in engine.engine.requests:  # freed at the next step
            await asyncio.sleep(0.01)
        return index, first, request

    index, first, request = asyncio.run(run())
    assert index == 0 and len(first.new_token_ids) >= 1  # more if the engine ran ahead
    assert len(request.output_token_ids) < 10_000
