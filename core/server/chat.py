"""`POST /v1/chat/completions`: messages formatted with the model's chat template, `n`,
`logprobs` / `top_logprobs`, streamed or not."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pegboard.core.disaggregation import attach_bootstrap
from pegboard.core.server.chunks import TextChunks
from pegboard.core.server.completions import ERROR_RESPONSES
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
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatDelta,
    ChatLogprobs,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from pegboard.core.server.security import require_api_key
from pegboard.core.server.streaming import collect, stream_events
from pegboard.sdk.types import TokenLogprobs

router = APIRouter(
    tags=["openai"], dependencies=[Depends(require_api_key)], route_class=GuardedRoute
)


@router.post(
    "/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERROR_RESPONSES
)
async def create_chat_completion(body: ChatCompletionRequest, http: Request):
    """Reply to a conversation `n` times (OpenAI's chat completions API)."""
    state = http.app.state.server
    engine = state.require_engine()
    state.check_model(body.model)
    messages = [m.as_template_dict() for m in body.messages]
    try:
        prompt = await asyncio.to_thread(
            engine.tokenizer.apply_chat_template, messages, body.add_generation_prompt
        )
    except Exception as e:  # no template, or the template rejects the conversation
        raise APIError(400, f"cannot apply the chat template: {e}", "messages") from e
    max_len = engine.engine.info.max_model_len
    check_context(len(prompt), body.max_new_tokens, max_len, "max_completion_tokens")
    max_tokens = body.max_new_tokens or max(max_len - len(prompt), 1)
    top_n = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, max_tokens, top_n)
    response_id = f"chatcmpl-{uuid.uuid4().hex}"
    requests = fan_out(engine, response_id, [prompt], [params], body.n, body.priority)
    attach_bootstrap(requests, body)  # PD: the room `pegboard router --pd` paired us with
    token_text = TokenText(engine.tokenizer)

    def usage(choices: list[ChoiceState]) -> Usage:
        generated = sum(c.num_tokens for c in choices)
        return Usage(
            prompt_tokens=len(prompt),
            completion_tokens=generated,
            total_tokens=len(prompt) + generated,
        )

    if body.stream:
        created = int(time.time())

        def chunk(choices: list[ChatChunkChoice], u: Usage | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(
                id=response_id, created=created, model=state.model_name, choices=choices, usage=u
            )

        text_chunks = TextChunks(
            lambda k: chunk([ChatChunkChoice(index=k, delta=ChatDelta(content=""))]), "content"
        )

        def delta(index, out, choice: ChoiceState) -> ChatCompletionChunk | str | None:
            if not (out.text or out.finished or out.new_logprobs):
                return None
            if not out.finished and not body.logprobs:  # most events: text only
                return text_chunks.render(index, out.text)
            lps = chat_logprobs(out.new_logprobs, token_text, top_n) if body.logprobs else None
            return chunk(
                [
                    ChatChunkChoice(
                        index=index,
                        delta=ChatDelta(content=out.text),
                        logprobs=lps,
                        finish_reason=choice.finish_reason,
                        timing=choice.timing,
                    )
                ]
            )

        first = [
            chunk([ChatChunkChoice(index=k, delta=ChatDelta(role="assistant", content=""))])
            for k in range(len(requests))
        ]
        events = stream_events(
            state,
            engine,
            requests,
            delta,
            first,
            (lambda choices: chunk([], usage(choices))) if body.include_usage else None,
        )
        return StreamingResponse(events, media_type="text/event-stream")

    choices = await collect(state, engine, requests, http)
    failed = failed_choice(choices)
    if failed is not None:
        raise APIError(500, failed.error or "generation failed")
    return ChatCompletionResponse(
        id=response_id,
        model=state.model_name,
        choices=[
            ChatChoice(
                index=c.index,
                message=AssistantMessage(content=c.text),
                logprobs=chat_logprobs(c.logprobs, token_text, top_n) if body.logprobs else None,
                finish_reason=c.finish_reason,
                timing=c.timing,
            )
            for c in choices
        ],
        usage=usage(choices),
    )


def chat_logprobs(
    logprobs: list[TokenLogprobs], token_text: TokenText, top_n: int | None
) -> ChatLogprobs:
    """The chat shape: per content token, its text, logprob, UTF-8 bytes and alternatives."""

    def entry(token_id: int, logprob: float) -> TopLogprob:
        text = token_text(token_id)
        return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

    content = []
    for lp in logprobs:
        chosen = entry(lp.token_id, lp.logprob)
        top = [entry(t, v) for t, v in lp.top[: top_n or 0]]
        content.append(ChatTokenLogprob(**chosen.model_dump(), top_logprobs=top))
    return ChatLogprobs(content=content)
