"""From an OpenAI request to engine requests and back: sampling parameters, the fan-out of
prompts × `n` into engine requests, and the merged stream of their deltas.

Choice `k` of a response is prompt `k // n`, sample `k % n`; with a `seed`, sample `i` uses
`seed + i` so that the `n` samples differ yet the response reproduces.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pegboard.core.async_engine import AsyncEngine
from pegboard.core.engine import RequestRejected
from pegboard.core.outputs import RequestOutput
from pegboard.core.server.errors import APIError
from pegboard.core.server.protocol import RequestTiming, SamplingFields
from pegboard.sdk.types import FinishReason, Request, SamplingParams, TokenLogprobs

#: Engine requests one HTTP request may fan out into (prompts × n).
MAX_CHOICES = 256


def sampling_params(
    body: SamplingFields, max_tokens: int, logprobs: int | None, default_temperature: float = 1.0
) -> SamplingParams:
    """The engine's `SamplingParams` for `body`; out-of-range combinations are a 422."""
    try:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=default_temperature if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=max(body.top_k, 0),
            min_p=body.min_p,
            seed=body.seed,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty,
            stop=body.stop_list,
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            skip_special_tokens=body.skip_special_tokens,
        )
    except ValueError as e:
        raise APIError(422, str(e)) from e


def fan_out(
    engine: AsyncEngine,
    response_id: str,
    prompts: list[list[int]],
    params: list[SamplingParams],
    n: int,
    priority: int,
) -> list[Request]:
    """One engine request per (prompt, sample), validated before any is queued (a 400 names
    the first prompt the engine cannot serve)."""
    if len(prompts) * n > MAX_CHOICES:
        raise APIError(422, f"prompts × n is {len(prompts) * n}; at most {MAX_CHOICES}", "n")
    requests = []
    for p, (ids, prompt_params) in enumerate(zip(prompts, params)):
        for i in range(n):
            sample_params = copy.copy(prompt_params)
            if sample_params.seed is not None:
                sample_params.seed += i
            k = p * n + i
            r = Request(ids, sample_params, request_id=f"{response_id}-{k}", priority=priority)
            try:
                engine.engine.validate(r)
            except RequestRejected as e:
                param = "messages" if response_id.startswith("chatcmpl") else "prompt"
                raise APIError(400, str(e), param) from e
            requests.append(r)
    return requests


async def merged_outputs(
    engine: AsyncEngine, requests: list[Request]
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Run `requests` concurrently and yield `(choice index, delta)` as deltas arrive, until
    every request finished. Closing the iterator early (a client disconnect) aborts the
    unfinished requests, which frees their KV at the engine's next step."""
    if len(requests) == 1:  # the common case: no task and queue between engine and caller
        async with contextlib.aclosing(_one_choice(engine, requests[0])) as outs:
            async for out in outs:  # closed early: the request is aborted at once
                yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    async def pump(index: int, request: Request) -> None:
        async for out in _one_choice(engine, request):
            queue.put_nowait((index, out))

    tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
    remaining = len(tasks)
    try:
        while remaining:
            index, out = await queue.get()
            remaining -= out.finished
            yield index, out
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _one_choice(engine: AsyncEngine, request: Request) -> AsyncIterator[RequestOutput]:
    """`engine.generate(request)`, except that a refusal or a broken engine ends the choice
    with an error delta instead of raising."""
    try:
        async with contextlib.aclosing(engine.generate(request)) as outs:
            async for out in outs:
                yield out
    except Exception as e:
        yield RequestOutput(
            request.request_id,
            finished=True,
            finish_reason=FinishReason.ERROR,
            error=f"{type(e).__name__}: {e}",
        )


@dataclass
class ChoiceState:
    """What a choice accumulated so far (non-streaming responses and usage counts)."""

    index: int
    text: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    timing: RequestTiming | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text
        self.num_tokens += len(out.new_token_ids)
        self.logprobs.extend(out.new_logprobs)
        if out.finished:
            reason = out.finish_reason
            self.finish_reason = reason.value if reason is not None else FinishReason.STOP.value
            self.error = out.error
            self.timing = request_timing(out.request)


def request_timing(r: Request | None) -> RequestTiming | None:
    """The time breakdown of a finished request (None if it never ran)."""
    if r is None or r.first_scheduled_time is None:
        return None
    now = time.monotonic()
    end = r.finished_time or now
    first = r.first_token_time or end
    return RequestTiming(
        queue_s=round(r.first_scheduled_time - r.arrival_time, 6),
        prefill_s=round(first - r.first_scheduled_time, 6),
        decode_s=round(end - first, 6),
        detokenize_s=round(max(now - end, 0.0), 6),
    )


def failed_choice(choices: list[ChoiceState]) -> ChoiceState | None:
    """The first choice a plugin failed, if any."""
    return next((c for c in choices if c.finish_reason == FinishReason.ERROR.value), None)


class TokenText:
    """Token strings for logprobs, decoded one token at a time (as vLLM reports them)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            self._cache[token_id] = text
        return text
