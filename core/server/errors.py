"""Every error leaves the server as OpenAI's envelope: `{"error": {"message", "type", "param",
"code"}}`, with the HTTP status as `code`. Malformed JSON is a 400, a body that does not match
the schema a 422, text the model's tokenizer cannot take a 400, an exception no handler expected
a 500 — the server keeps serving."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pegboard.core.tokenizer import TokenizerError
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("pegboard.server")

#: The error `type` of each status, as OpenAI names them.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    422: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error answered to the client with `status` and OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error envelope for `status`."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "invalid_request_error"),
            "param": param,
            "code": status,
        }
    }


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation failures, HTTP errors and unexpected exceptions in OpenAI's shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return APIError(400, "the request body is not valid JSON").response()
        first = errors[0] if errors else {}
        loc = [str(part) for part in first.get("loc", ()) if part != "body"]
        messages = [_describe(e) for e in errors[:5]]
        return APIError(422, "; ".join(messages), ".".join(loc) or None).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(exc.status_code, str(exc.detail)),
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(TokenizerError)
    async def _tokenizer_error(request: Request, exc: TokenizerError) -> JSONResponse:
        # the request asked for what this model's tokenizer cannot do (e.g. text for a model
        # without one): the client's to fix, not a server fault
        return APIError(400, str(exc), "prompt").response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error serving %s %s", request.method, request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()


def _describe(error: dict) -> str:
    loc = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
    message = str(error.get("msg", "invalid value"))
    return f"{loc}: {message}" if loc else message
