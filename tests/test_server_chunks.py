"""The per-token stream event rendered from a template is byte for byte the pydantic chunk."""

import json

import pytest
from pegboard.core.server.chunks import TextChunks
from pegboard.core.server.protocol import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatDelta,
    CompletionChoice,
    CompletionResponse,
)
from pegboard.core.server.streaming import sse

NASTY = [
    "",
    "plain",
    'say "hi"',
    "back\\slash \\n not a newline",
    "line\nbreak\r\ttab\b\f",
    "".join(chr(c) for c in range(0x20)) + "\x7f",
    "héllo wörld ✓ 日本語 🙂",
    "\u2028\u2029 separators",
    "\ufffd half of a multi-byte character",
    '"text":"" and "content":"" inside the text',
    "</script><!-- & ' -->",
]


def completion(model: str, index: int, text: str) -> CompletionResponse:
    choice = CompletionChoice(index=index, text=text)
    return CompletionResponse(id="cmpl-1", created=7, model=model, choices=[choice])


def chat(model: str, index: int, text: str) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=ChatDelta(content=text))
    return ChatCompletionChunk(id="chatcmpl-1", created=7, model=model, choices=[choice])


@pytest.mark.parametrize(("make", "field"), [(completion, "text"), (chat, "content")])
@pytest.mark.parametrize("model", ["m", 'tricky "text":"" "content":"" model\\'])
def test_text_chunks_match_the_model_dump(make, field, model):
    chunks = TextChunks(lambda k: make(model, k, ""), field)
    for index in (0, 3):
        for text in NASTY:
            rendered = chunks.render(index, text)
            assert rendered == sse(make(model, index, text))
            payload = json.loads(rendered.removeprefix("data: "))
            assert payload["choices"][0]["index"] == index
            got = payload["choices"][0].get("text", payload["choices"][0].get("delta", {}))
            assert (got if field == "text" else got["content"]) == text


def test_a_field_that_is_not_empty_in_the_template_is_refused():
    chunks = TextChunks(lambda k: completion("m", k, "not empty"), "text")
    with pytest.raises(ValueError, match="exactly once"):
        chunks.render(0, "x")
