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

    def absorb(self, later: RequestOutput) -> None:
        """Append `later`, the same request's next delta, to this one: one delta carrying both
        steps' tokens, text and logprobs, finished if `later` is (a stream whose reader fell
        behind catches up in one event, as vLLM's output collector merges deltas)."""
        self.new_token_ids.extend(later.new_token_ids)
        self.text += later.text
        self.new_logprobs.extend(later.new_logprobs)
        self.finished, self.finish_reason = later.finished, later.finish_reason
        self.error = later.error
        self.request = later.request or self.request


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
