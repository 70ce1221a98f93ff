"""`POST /v1/completions`: text or token-id prompts (one or a batch), `n`, `echo`, legacy
`logprobs`, streamed or not."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pegboard.core.disaggregation import attach_bootstrap
from pegboard.core.server.chunks import TextChunks
from pegboard.core.server.errors import APIError
from pegboard.core.server.generation import (
    ChoiceState,
    TokenText,
    failed_choice,
    fan_out,
    sampling_params,
)
from pegboard.core.server.limits import GuardedRoute, check_context
from pegboard.core.server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    Usage,
)
from pegboard.core.server.security import require_api_key
from pegboard.core.server.streaming import collect, stream_events
from pegboard.sdk.types import TokenLogprobs

ERROR_RESPONSES = {status: {"model": ErrorResponse} for status in (400, 401, 404, 422, 500, 503)}

router = APIRouter(
    tags=["openai"], dependencies=[Depends(require_api_key)], route_class=GuardedRoute
)


@router.post("/v1/completions", response_model=CompletionResponse, responses=ERROR_RESPONSES)
async def create_completion(body: CompletionRequest, http: Request):
    """Complete each prompt `n` times (OpenAI's legacy completions API)."""
    state = http.app.state.server
    engine = state.require_engine()
    state.check_model(body.model)
    prompts = body.prompts()
    tokenizer = engine.tokenizer
    if any(isinstance(p, str) for p in prompts):  # tokenized off the event loop
        prompt_ids = await asyncio.to_thread(
            lambda: [tokenizer.encode(p) if isinstance(p, str) else p for p in prompts]
        )
    else:  # token ids: nothing to tokenize
        prompt_ids = prompts
    max_len = engine.engine.info.max_model_len
    if "max_tokens" in body.model_fields_set:
        for ids in prompt_ids:
            check_context(len(ids), body.max_tokens, max_len, "max_tokens")
    params = [
        sampling_params(body, body.max_tokens or max(max_len - len(ids), 1), body.logprobs)
        for ids in prompt_ids
    ]
    response_id = f"cmpl-{uuid.uuid4().hex}"
    requests = fan_out(engine, response_id, prompt_ids, params, body.n, body.priority)
    attach_bootstrap(requests, body)  # PD: the room `pegboard router --pd` paired us with
    echoes = [""] * len(requests)
    if body.echo:
        texts = [p if isinstance(p, str) else tokenizer.decode(p) for p in prompts]
        echoes = [texts[k // body.n] for k in range(len(requests))]
    token_text = TokenText(tokenizer)
    num_prompt_tokens = sum(len(ids) for ids in prompt_ids)

    def usage(choices: list[ChoiceState]) -> Usage:
        generated = sum(c.num_tokens for c in choices)
        return Usage(
            prompt_tokens=num_prompt_tokens,
            completion_tokens=generated,
            total_tokens=num_prompt_tokens + generated,
        )

    created = int(time.time())

    def response(choices: list[CompletionChoice], u: Usage | None = None) -> CompletionResponse:
        return CompletionResponse(
            id=response_id, created=created, model=state.model_name, choices=choices, usage=u
        )

    if body.stream:
        text_chunks = TextChunks(lambda k: response([CompletionChoice(index=k, text="")]), "text")

        def delta(index, out, choice: ChoiceState) -> CompletionResponse | str | None:
            if not (out.text or out.finished or out.new_logprobs):
                return None
            if not out.finished and body.logprobs is None:  # most events: text only
                return text_chunks.render(index, out.text)
            lps = None
            if body.logprobs is not None:
                offset = len(echoes[index]) + len(choice.text) - len(out.text)
                lps = completion_logprobs(out.new_logprobs, token_text, offset)
            return response(
                [
                    CompletionChoice(
                        index=index,
                        text=out.text,
                        logprobs=lps,
                        finish_reason=choice.finish_reason,
                        timing=choice.timing,
                    )
                ]
            )

        first = [
            response([CompletionChoice(index=k, text=echo)])
            for k, echo in enumerate(echoes)
            if echo
        ]
        events = stream_events(
            state,
            engine,
            requests,
            delta,
            first,
            (lambda choices: response([], usage(choices))) if body.include_usage else None,
        )
        return StreamingResponse(events, media_type="text/event-stream")

    choices = await collect(state, engine, requests, http)
    failed = failed_choice(choices)
    if failed is not None:
        raise APIError(500, failed.error or "generation failed")
    return response(
        [
            CompletionChoice(
                index=c.index,
                text=echoes[c.index] + c.text,
                logprobs=completion_logprobs(c.logprobs, token_text, 0)
                if body.logprobs is not None
                else None,
                finish_reason=c.finish_reason,
                timing=c.timing,
            )
            for c in choices
        ],
        usage(choices),
    )


def completion_logprobs(
    logprobs: list[TokenLogprobs], token_text: TokenText, offset: int
) -> CompletionLogprobs:
    """The legacy shape: parallel lists of tokens, their logprobs, the top alternatives and each
    token's character offset in the choice's text."""
    result = CompletionLogprobs()
    for lp in logprobs:
        token = token_text(lp.token_id)
        result.tokens.append(token)
        result.token_logprobs.append(lp.logprob)
        result.top_logprobs.append({token_text(t): v for t, v in lp.top})
        result.text_offset.append(offset)
        offset += len(token)
    return result
