"""What the engine hands back per request per step, and when a request stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from pegboard.sdk.types import FinishReason, Request, TokenLogprobs


@dataclass
class RequestOutput:
    """The progress of one request in one engine step (a streaming delta).

    `new_token_ids` / `text` are what this step added; `finished` is set once, on the last
    delta, with `finish_reason`. The cumulative state is on `request`.
    """

    request_id: str
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    new_logprobs: list[TokenLogprobs] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    error: str | None = None
    request: Request | None = None


def stop_reason(request: Request, token_id: int, max_model_len: int) -> FinishReason | None:
    """Why generation ends after `token_id` was appended, from token ids and lengths alone.

    Stop strings are found by the detokenizer, since they can span token boundaries."""
    params = request.params
    if not params.ignore_eos and token_id in request.eos_token_ids:
        return FinishReason.STOP
    if token_id in params.stop_token_ids:
        return FinishReason.STOP
    if (
        len(request.output_token_ids) >= params.max_tokens
        or len(request.token_ids) >= max_model_len
    ):
        return FinishReason.LENGTH
    return None
