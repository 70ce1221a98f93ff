"""Driving a response's engine requests: as server-sent events (`data: {...}\\n\\n`, ending in
`data: [DONE]`), or collected into one response.

Either way the requests count as in flight for the drain, and a client that goes away has its
requests aborted: Starlette cancels a streaming response's task on disconnect, and a waiting
non-streaming response polls for the disconnect itself.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterable

import pydantic
from fastapi import Request as HTTPRequest
from pegboard.core.async_engine import AsyncEngine
from pegboard.core.outputs import RequestOutput
from pegboard.core.server.errors import error_body
from pegboard.core.server.generation import ChoiceState, merged_outputs
from pegboard.core.server.lifecycle import ServerState
from pegboard.sdk.types import Request

DONE = "data: [DONE]\n\n"
#: How often a non-streaming response checks whether its client is still there.
DISCONNECT_POLL_S = 0.5


def sse(payload: pydantic.BaseModel | dict) -> str:
    """One server-sent event carrying `payload` as JSON."""
    if isinstance(payload, pydantic.BaseModel):
        return f"data: {payload.model_dump_json()}\n\n"
    return f"data: {pydantic.TypeAdapter(dict).dump_json(payload).decode()}\n\n"


async def stream_events(
    state: ServerState,
    engine: AsyncEngine,
    requests: list[Request],
    delta: Callable[[int, RequestOutput, ChoiceState], pydantic.BaseModel | str | None],
    first: Iterable[pydantic.BaseModel] = (),
    usage: Callable[[list[ChoiceState]], pydantic.BaseModel] | None = None,
) -> AsyncIterator[str]:
    """The event stream of a response: `first` chunks, one chunk per delta (`delta` may skip
    one by returning None, or return the event already rendered), the usage chunk if asked
    for, then `[DONE]`. A choice that a
    plugin failed ends the stream with an error event."""
    with state.tracked():
        choices = [ChoiceState(i) for i in range(len(requests))]
        for chunk in first:
            yield sse(chunk)
        async for index, out in merged_outputs(engine, requests):
            choice = choices[index]
            choice.add(out)
            if choice.finish_reason == "error":
                yield sse(error_body(500, choice.error or "generation failed"))
                yield DONE
                return
            chunk = delta(index, out, choice)
            if chunk is not None:
                yield chunk if isinstance(chunk, str) else sse(chunk)
        if usage is not None:
            yield sse(usage(choices))
        yield DONE


async def collect(
    state: ServerState, engine: AsyncEngine, requests: list[Request], http: HTTPRequest
) -> list[ChoiceState]:
    """Run the requests to the end and return each choice; abort them if the client leaves."""
    with state.tracked():
        choices = [ChoiceState(i) for i in range(len(requests))]

        async def consume() -> None:
            async for index, out in merged_outputs(engine, requests):
                choices[index].add(out)

        task = asyncio.create_task(consume())
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if done:
                    task.result()
                    return choices
                if await http.is_disconnected():
                    return choices
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
