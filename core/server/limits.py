"""What a request may cost before the server does any work for it.

- The body: over `--max-request-bytes` it is a 413, answered from the `Content-Length` header
  (or, for a chunked body, as soon as the bytes read pass the cap), never parsed.
- Parsing: a large body is parsed off the event loop, and its prompt is measured there: text
  longer than any prompt the context could hold, or more token ids than the context, is a 400
  before it is tokenized or validated. Text that is not valid Unicode (a lone surrogate such as
  `"\\ud800"`) is a 400 too: it cannot be tokenized nor written back in an error.
- Lengths: a prompt plus `max_tokens` beyond the context is a 400, as vLLM answers it.
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
from collections.abc import Callable
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from pegboard.core.server.errors import APIError, error_body
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: Default of `--max-request-bytes`.
DEFAULT_MAX_REQUEST_BYTES = 32 << 20
#: Bodies up to this size are parsed on the event loop (it takes microseconds).
INLINE_PARSE_BYTES = 64 << 10
#: Characters of text per token of the context that a prompt may have, beyond the longest token
#: of the vocabulary (normalizers can fold a few characters into fewer).
CHAR_SLACK = 2
# A JSON escape of a UTF-16 surrogate: the only way a lone surrogate enters a request.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


class BodySizeLimit:
    """ASGI middleware: a request body over `max_bytes` is answered 413 without being read
    (declared length) or as soon as the bytes received pass the cap (chunked)."""

    def __init__(self, app: ASGIApp, max_bytes: Callable[[], int]) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cap = self.max_bytes()
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > cap:
            return await _too_large(cap, scope, receive, send)
        if declared is not None:
            return await self.app(scope, receive, send)
        # No declared length (chunked): buffer up to the cap, then replay the body.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > cap:
                return await _too_large(cap, scope, receive, send)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)


#: After a 413 the rest of the upload is read and dropped, chunk by chunk (at most this much,
#: for at most `DRAIN_SECONDS`), before the response ends and the connection closes: closing a
#: socket with unread bytes resets it, and the client then loses the 413 it has not read yet.
DRAIN_BYTES = 256 << 20
DRAIN_SECONDS = 5.0


async def _too_large(cap: int, scope: Scope, receive: Receive, send: Send) -> None:
    message = f"the request body is larger than {cap} bytes (--max-request-bytes)"
    response = JSONResponse(
        error_body(413, message), status_code=413, headers={"Connection": "close"}
    )
    await send({"type": "http.response.start", "status": 413, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body, "more_body": True})
    await _drain(receive)
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _drain(receive: Receive) -> None:
    """Read and drop what is left of the request body, within the bounds above."""
    loop = asyncio.get_running_loop()
    deadline, drained = loop.time() + DRAIN_SECONDS, 0
    while drained < DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class GuardedRequest(Request):
    """A request whose JSON body is parsed off the event loop when large, and checked for
    invalid Unicode and oversized prompts before validation."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            limits = prompt_limits(self.app.state.server)
            if len(body) <= INLINE_PARSE_BYTES:
                self._json = parse_body(body, limits)
            else:
                self._json = await asyncio.to_thread(parse_body, body, limits)
        return self._json


class GuardedRoute(APIRoute):
    """Routes whose handlers see a `GuardedRequest` (FastAPI's custom request class idiom)."""

    def get_route_handler(self) -> Callable:
        handler = super().get_route_handler()

        async def guarded(request: Request):
            return await handler(GuardedRequest(request.scope, request.receive))

        return guarded


@functools.lru_cache(maxsize=8)
def longest_token_chars(tokenizer: Any) -> int:
    """Characters of the longest token string of `tokenizer`'s vocabulary."""
    hf = getattr(tokenizer, "hf", None)
    vocab = hf.get_vocab() if hf is not None else {}
    return max((len(t) for t in vocab), default=16)


def prompt_limits(state: Any) -> tuple[int, int] | None:
    """(most token ids, most characters) a prompt may have, or None while no engine runs."""
    engine = state.engine
    if engine is None:
        return None
    max_len = engine.engine.info.max_model_len
    return max_len, max_len * longest_token_chars(engine.tokenizer) * CHAR_SLACK


def parse_body(body: bytes, limits: tuple[int, int] | None) -> Any:
    """The JSON of `body`; a 400 (as `HTTPException`, which FastAPI passes through) for text
    that is not valid Unicode or a prompt larger than `limits`."""
    data = json.loads(body)
    if _SURROGATE_ESCAPE.search(body):
        try:
            json.dumps(data, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as e:
            raise HTTPException(
                400, "the request contains text that is not valid Unicode (a lone surrogate)"
            ) from e
    if limits is not None and isinstance(data, dict):
        check_prompt_size(data, *limits)
    return data


def check_prompt_size(data: dict, max_ids: int, max_chars: int) -> None:
    """400 for a `prompt` (text, token ids or a batch of either) or `messages` larger than
    any prompt the context can hold. Measures only: nothing is tokenized."""
    prompts = data.get("prompt")
    if isinstance(prompts, str) or (isinstance(prompts, list) and _is_ids(prompts)):
        prompts = [prompts]
    for p in prompts if isinstance(prompts, list) else []:
        if isinstance(p, str) and len(p) > max_chars:
            raise HTTPException(400, _too_long(f"{len(p)} characters", max_chars, max_ids))
        if isinstance(p, list) and len(p) > max_ids:
            raise HTTPException(
                400, f"the prompt is {len(p)} token ids; the context holds {max_ids} tokens"
            )
    messages = data.get("messages")
    if isinstance(messages, list):
        chars = sum(_content_chars(m) for m in messages)
        if chars > max_chars:
            raise HTTPException(400, _too_long(f"{chars} characters", max_chars, max_ids))


def _is_ids(p: list) -> bool:
    return bool(p) and not isinstance(p[0], (str, list))


def _content_chars(message: Any) -> int:
    content = message.get("content") if isinstance(message, dict) else None
    if isinstance(content, str):
        return len(content)
    if isinstance(content, list):
        return sum(len(part.get("text") or "") for part in content if isinstance(part, dict))
    return 0


def _too_long(size: str, max_chars: int, max_ids: int) -> str:
    return (
        f"the prompt is {size}, more than any prompt that fits the context of {max_ids} "
        f"tokens ({max_chars} characters at most)"
    )


def check_context(num_prompt_tokens: int, max_tokens: int | None, max_len: int, param: str):
    """400 when the prompt plus `max_tokens` exceeds the context (vLLM's message)."""
    if max_tokens is not None and num_prompt_tokens + max_tokens > max_len:
        raise APIError(
            400,
            f"This model's maximum context length is {max_len} tokens. However, you requested "
            f"{num_prompt_tokens + max_tokens} tokens ({num_prompt_tokens} in the prompt, "
            f"{max_tokens} in the completion). Please reduce the length of the prompt or "
            "max_tokens.",
            param,
        )
