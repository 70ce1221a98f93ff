"""`hello`: a fair-share scheduling policy, packaged the way any third-party plugin is."""

from __future__ import annotations

from typing import Any, ClassVar

import pydantic
from pegboard.sdk.scheduling import PolicyOptions, PolicyScheduler
from pegboard.sdk.types import Request


class HelloOptions(PolicyOptions):
    """Options of `HelloScheduler` (flags `--hello-<field>`)."""

    prompt_weight: float = pydantic.Field(
        0.0,
        ge=0.0,
        description=(
            "Weight of prompt length in a request's share: its turn comes by generated tokens "
            "+ this x prompt tokens (0: generated tokens alone)."
        ),
    )


class HelloScheduler(PolicyScheduler):
    """Fair share: requests are considered by how much they have been served — generated
    tokens plus `prompt_weight` x prompt tokens — least served first, ties in arrival order.

    Under a tight token budget, requests that have produced fewer tokens run first, so a
    burst of long generations cannot monopolise the batch. Waiting requests are not blocked by
    one that does not fit (`head_of_line_blocking = False`): smaller ones behind it are tried.
    """

    name = "hello"
    Options: ClassVar[type[pydantic.BaseModel]] = HelloOptions
    head_of_line_blocking: ClassVar[bool] = False

    def sort_key(self, request: Request) -> Any:
        served = request.num_output_tokens + self.options.prompt_weight * request.num_prompt_tokens
        return (served, request.seq)
