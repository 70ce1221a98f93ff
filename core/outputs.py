"""What the engine hands back per request per step, and when a request stops."""

from __future__ import annotations

from dataclasses import dataclass, field

from pegboard.sdk.types import FinishReason, Request, TokenLogprobs


@dataclass(slots=True)  # built for every request in every step (twice: tokens, then text)
class RequestOutput:
    """The progress of one request in one engine step (a streaming delta).

    `new_token_ids` / `text` are what this step added; `finished` is set once, on the last
    delta, with `finish_reason`. The cumulative state is on `request`. A request whose
    `params.output_kind` is `"final"` gets only its last one from the detokenizer, with the
    whole text as `text` (its token ids and logprobs stay the last step's).
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


def first_stop(request: Request, tokens, max_model_len: int) -> tuple[int, FinishReason] | None:
    """Where generation ends in `tokens`, output tokens about to be appended to `request` (a
    step's sampled token, or a verify step's accepted drafts and the target's token), from
    token ids and lengths alone: the index of the first token after which the request stops
    and why (an EOS token unless `ignore_eos`, a stop token: `STOP`, before `LENGTH` at the same
    token; `max_tokens` or `max_model_len` reached: `LENGTH`), or None.

    Stop strings are found by the detokenizer, since they can span token boundaries."""
    params = request.params
    # appending token i makes the output `len(output_token_ids) + i + 1` tokens long
    last = params.max_tokens - len(request.output_token_ids) - 1  # the last token that fits
    context = max_model_len - len(request.token_ids) - 1
    if context < last:
        last = context
    eos = request.eos_token_ids if not params.ignore_eos else ()
    stops = params.stop_token_ids
    n = len(tokens)
    if (eos or stops) and n == 1:  # a plain step's token (no loop: the hot path at batch 64)
        if tokens[0] in eos or tokens[0] in stops:
            return 0, FinishReason.STOP
    elif eos or stops:
        for i, t in enumerate(tokens):
            if t in eos or t in stops:
                return i, FinishReason.STOP
            if i >= last:  # (the first token always counts)
                break
    if last < n:
        return (last if last > 0 else 0), FinishReason.LENGTH
    return None
