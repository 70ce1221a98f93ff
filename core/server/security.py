"""Bearer-token guards: `--api-key` for the `/v1` endpoints, `--admin-token` for `/admin`.

They are coroutines although they never wait: FastAPI runs a plain function dependency in its
thread pool, a hop per request that the event loop pays for."""

from __future__ import annotations

import hmac

from fastapi import Request
from pegboard.core.server.errors import APIError


def _bearer(http: Request) -> str | None:
    header = http.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


async def require_api_key(http: Request) -> None:
    """401 unless the request carries the API key (when one is configured)."""
    key = http.app.state.server.settings.api_key
    if key is None:
        return
    token = _bearer(http)
    if token is None or not hmac.compare_digest(token.encode(), key.encode()):
        raise APIError(401, "a valid API key is required: send 'Authorization: Bearer <key>'")


async def require_admin(http: Request) -> None:
    """401 without a bearer token, 403 with a wrong one."""
    expected = http.app.state.server.settings.admin_token
    token = _bearer(http)
    if token is None:
        raise APIError(401, "the admin API needs 'Authorization: Bearer <admin token>'")
    if expected is None or not hmac.compare_digest(token.encode(), expected.encode()):
        raise APIError(403, "the admin token is not valid")
