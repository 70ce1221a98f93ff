"""What a routing policy sees: the request being routed and the workers it may go to.

Both are plain data built by the router process (`pegboard router`, or `pegboard serve
--dp-size N`) per request; a policy reads them and never calls a worker itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

#: The body field each routed endpoint is keyed by (`RouteRequest.text`).
KEY_FIELDS = {"/v1/completions": "prompt", "/v1/chat/completions": "messages"}


class RequestBodyError(ValueError):
    """The request body is not a JSON object (the router answers 400 with this message)."""


class RouteRequest:
    """One HTTP request to route.

    - `path`: the OpenAI endpoint (`/v1/completions`, `/v1/chat/completions`).
    - `text`: the routing key a cache-aware policy matches on: the prompt text, the chat
      messages' contents joined, or a token-id prompt written one character per id
      (`prompt_key`), so equal prompt prefixes give equal key prefixes.
    - `body`: the parsed JSON body (read it, do not change it).
    - `retry_of`: workers this request already failed on (connection refused, died before its
      first byte); they are not in `workers` for this call.

    The router hands over the raw body (`raw=`) and parses it only when a policy first reads
    `text` or `body` (round robin and least load never do, so their requests pass through
    unparsed); a body that is not a JSON object raises `RequestBodyError` there.
    """

    __slots__ = ("path", "retry_of", "_text", "_body", "_raw")

    def __init__(
        self,
        path: str,
        text: str | None = None,
        body: dict[str, Any] | None = None,
        retry_of: tuple[str, ...] = (),
        *,
        raw: bytes | None = None,
    ) -> None:
        self.path = path
        self.retry_of = retry_of
        self._text = text
        self._body = body
        self._raw = raw

    @property
    def body(self) -> dict[str, Any]:
        if self._body is None:
            self._body = parse_body(self._raw) if self._raw is not None else {}
        return self._body

    @property
    def text(self) -> str:
        if self._text is None:
            self._text = prompt_key(self.body.get(KEY_FIELDS.get(self.path, "prompt")))
        return self._text

    @property
    def max_tokens(self) -> int:
        value = self.body.get("max_tokens") or self.body.get("max_completion_tokens") or 0
        return value if isinstance(value, int) else 0

    def __repr__(self) -> str:
        return f"RouteRequest({self.path!r}, retry_of={self.retry_of!r})"


def parse_body(raw: bytes) -> dict[str, Any]:
    """A request body as a JSON object; `RequestBodyError` otherwise."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestBodyError(f"the request body is not valid JSON: {e}") from e
    if not isinstance(body, dict):
        raise RequestBodyError("the request body must be a JSON object")
    return body


@dataclass
class WorkerLoad:
    """A worker as the router sees it when routing.

    - `url`: its base address (`http://127.0.0.1:8001`); `route` returns one of these.
    - `in_flight`: requests this router has open on it now (counted by the router, exact).
    - `reported_requests`, `reported_tokens`: what the worker last said on its load endpoint
      (`GET /load` of a pegboard server: requests it holds, tokens they occupy), covering
      traffic from other clients too; None for a server without that endpoint.
    """

    url: str
    in_flight: int = 0
    reported_requests: int | None = None
    reported_tokens: int | None = None

    @property
    def requests(self) -> int:
        """The best estimate of the worker's queue length: the larger of the two counts (the
        router's is fresh, the worker's includes other clients')."""
        return max(self.in_flight, self.reported_requests or 0)

    @property
    def tokens(self) -> int:
        return self.reported_tokens or 0


def prompt_key(prompt: Any) -> str:
    """The routing key of a completions `prompt` or chat `messages`: text stays text, a list
    of token ids becomes one character per id, lists are joined."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return "".join(chr(t) if 0 <= t < 0x110000 else "\ufffd" for t in prompt)
    if isinstance(prompt, list):
        return "\n".join(prompt_key(p) for p in prompt)
    if isinstance(prompt, dict):  # a chat message: {"role": ..., "content": str | parts}
        content = prompt.get("content")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return f"{prompt.get('role', '')}:{content or ''}"
    return ""
