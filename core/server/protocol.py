"""The OpenAI wire format: request and response models of `/v1/completions`,
`/v1/chat/completions` and `/v1/models`, plus pegboard's sampling extensions.

Ranges follow OpenAI's documented limits; a value outside them is a 422, as is a value of the
wrong JSON type (`"stream": "yes"`, `"n": "2"`: types are strict). Unknown request fields
are ignored (clients send fields of newer API versions), but fields whose meaning pegboard does
not implement are rejected when set (`logit_bias`, `suffix`, tools), never silently dropped.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import pydantic
from pydantic import Field

TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Stop = str | Annotated[list[str], Field(max_length=16)] | None


class _Request(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    """`stream_options`: `include_usage` adds a final chunk with token counts."""

    include_usage: bool = False


class SamplingFields(_Request):
    """Sampling parameters both endpoints share (OpenAI's, then pegboard's extensions)."""

    model: str | None = Field(None, description="served model name; omitted: the served model")
    n: int = Field(1, ge=1, le=64, description="completions per prompt")
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    seed: int | None = Field(None, ge=0, le=2**62, description="choice i uses seed + i")
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # pegboard extensions (as in vLLM and SGLang).
    top_k: int = Field(0, ge=-1, description="keep the k most likely tokens; 0 or -1: off")
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    priority: int = Field(0, description="lower runs first under the priority scheduler")
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    skip_special_tokens: bool = True
    # PD disaggregation: the prefill engine and room `pegboard router --pd` pairs us with.
    bootstrap_host: str | None = None
    bootstrap_port: int | None = Field(None, ge=1, le=65535)
    bootstrap_room: int | None = Field(None, ge=0, le=2**63 - 1)

    @pydantic.field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported")
        return value

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(SamplingFields):
    """`POST /v1/completions`."""

    prompt: (
        str
        | Annotated[list[str], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    )
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=20, description="false: none")
    echo: bool = False
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @pydantic.field_validator("logprobs", mode="before")
    @classmethod
    def _false_is_none(cls, value: Any) -> Any:
        return None if value is False else value

    @pydantic.model_validator(mode="after")
    def _supported(self) -> CompletionRequest:
        if self.suffix:
            raise ValueError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of other than n is not supported")
        if self.echo and self.logprobs is not None:
            raise ValueError("echo together with logprobs is not supported")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts of a (possibly batched) request, each text or token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(_Request):
    """A text part of a message's content (the only part type a text model takes)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One message of a conversation."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def as_template_dict(self) -> dict[str, Any]:
        content = self.content
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        message: dict[str, Any] = {"role": self.role, "content": content or ""}
        if self.name:
            message["name"] = self.name
        return message


class ResponseFormat(_Request):
    """`response_format`: only plain text is produced."""

    type: Literal["text"]


class ChatCompletionRequest(SamplingFields):
    """`POST /v1/chat/completions`."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(
        None, ge=1, description="deprecated alias of max_completion_tokens"
    )
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True

    @pydantic.model_validator(mode="after")
    def _supported(self) -> ChatCompletionRequest:
        if self.tools:
            raise ValueError("tools are not supported")
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---------------------------------------------------------------- responses


class Usage(pydantic.BaseModel):
    """Token counts of a response (prompt tokens counted once per prompt, not per choice)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class RequestTiming(pydantic.BaseModel):
    """Where a choice's time went (pegboard's extension, as SGLang's per-request breakdown):
    seconds queued before its first step, in prefill until its first token, in decode until
    its last, and from the engine finishing it until its last text delta reached the server
    (detokenization and delivery)."""

    queue_s: float
    prefill_s: float
    decode_s: float
    detokenize_s: float


class CompletionLogprobs(pydantic.BaseModel):
    """The legacy completions logprobs shape."""

    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float] = Field(default_factory=list)
    top_logprobs: list[dict[str, float]] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(pydantic.BaseModel):
    """One choice of a completion (or one delta of a streamed one)."""

    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    timing: RequestTiming | None = None


class CompletionResponse(pydantic.BaseModel):
    """A completion, or one chunk of a streamed completion (same object type, as OpenAI)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(pydantic.BaseModel):
    """An alternative token at one position."""

    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    """The chosen token at one position and its alternatives."""

    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(pydantic.BaseModel):
    """Logprobs of a chat choice's content tokens."""

    content: list[ChatTokenLogprob] = Field(default_factory=list)


class AssistantMessage(pydantic.BaseModel):
    """The generated message of a chat choice."""

    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(pydantic.BaseModel):
    """One choice of a chat completion."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    timing: RequestTiming | None = None


class ChatCompletionResponse(pydantic.BaseModel):
    """A chat completion."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(pydantic.BaseModel):
    """What one streamed chunk adds to a choice's message."""

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(pydantic.BaseModel):
    """One choice's delta in a streamed chat chunk."""

    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    timing: RequestTiming | None = None


class ChatCompletionChunk(pydantic.BaseModel):
    """One chunk of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(pydantic.BaseModel):
    """An entry of `GET /v1/models`."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "pegboard"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(pydantic.BaseModel):
    """`GET /v1/models`."""

    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(pydantic.BaseModel):
    """The `error` object of every error response."""

    message: str
    type: str
    param: str | None = None
    code: int | str | None = None


class ErrorResponse(pydantic.BaseModel):
    """OpenAI's error envelope."""

    error: ErrorBody
