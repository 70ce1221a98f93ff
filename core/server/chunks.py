"""The per-token event of a stream, rendered without a pydantic model per event.

Most events of a streamed response carry nothing but a choice's new text: the same id, model,
creation time and choice index every time. `TextChunks` renders that chunk once through its
pydantic model with an empty text, splits it at the text's place, and fills each event's text
in with `json.dumps` (the same JSON escaping rules; non-ASCII written as UTF-8, as pydantic
does). Chunks with logprobs, a finish reason or usage keep going through their models.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pydantic

_encode_text = json.JSONEncoder(ensure_ascii=False).encode


class TextChunks:
    """`render(index, text)` is `sse(make(index, ""))` with `text` in place of the empty
    `field` (`"text"` or `"content"`), byte for byte what the model would dump."""

    def __init__(self, make: Callable[[int], pydantic.BaseModel], field: str) -> None:
        self._make = make
        self._key = f'"{field}":'
        self._templates: dict[int, tuple[str, str]] = {}

    def render(self, index: int, text: str) -> str:
        template = self._templates.get(index)
        if template is None:
            template = self._templates[index] = self._template(index)
        head, tail = template
        return head + _encode_text(text) + tail

    def _template(self, index: int) -> tuple[str, str]:
        dumped = self._make(index).model_dump_json()
        # The marker is found once: inside a JSON string its quotes would be escaped.
        marker = self._key + '""'
        head, found, tail = dumped.partition(marker)
        if not found or marker in tail:
            raise ValueError(f"{marker} is not in the chunk exactly once: {dumped}")
        return f"data: {head}{self._key}", f"{tail}\n\n"
