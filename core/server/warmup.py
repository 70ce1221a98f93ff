"""The warm-up request: one dummy generation through prefill and decode before `/health`
answers 200, so that kernel JIT compilation, Triton autotuning and first-use allocations have
happened when the first user arrives (as SGLang's server warm-up). `serve --skip-warmup` turns
it off."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from pegboard.core.async_engine import AsyncEngine
from pegboard.sdk.types import FinishReason, Request, SamplingParams

log = logging.getLogger("pegboard.server")

#: Prompt tokens and generated tokens of the warm-up request.
WARMUP_PROMPT_TOKENS = 16
WARMUP_OUTPUT_TOKENS = 4
#: Request ids of warm-up requests start with this (metrics exporters see them as requests).
WARMUP_PREFIX = "warmup-"


def warm_up(engine: AsyncEngine) -> None:
    """Run the warm-up request to completion; RuntimeError if the engine failed it."""
    info = engine.engine.info
    n = max(1, min(WARMUP_PROMPT_TOKENS, info.max_model_len - WARMUP_OUTPUT_TOKENS - 1))
    prompt = [(7 * i + 1) % info.vocab_size for i in range(n)]
    params = SamplingParams(max_tokens=WARMUP_OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    request = Request(prompt, params, request_id=f"{WARMUP_PREFIX}{uuid.uuid4().hex[:8]}")
    started = time.perf_counter()

    async def run():
        async for out in engine.generate(request):
            if out.finished:
                return out
        return None

    out = asyncio.run(run())
    if out is None or out.finish_reason is FinishReason.ERROR:
        raise RuntimeError(f"the warm-up request failed: {out.error if out else 'no output'}")
    log.info("warm-up request done in %.2f s", time.perf_counter() - started)
