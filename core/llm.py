"""The offline API: `LLM(model_dir, **settings).generate(prompts, params)`."""

from __future__ import annotations

import copy
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pegboard.core.config import EngineConfig
from pegboard.core.engine import Engine
from pegboard.core.outputs import RequestOutput
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.types import FinishReason, Request, SamplingParams, TokenLogprobs
from tqdm.auto import tqdm

Prompt = str | list[int]


@dataclass
class CompletionOutput:
    """One finished generation."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    finish_reason: FinishReason | None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    error: str | None = None


class LLM:
    """Load a model and generate, offline.

    `model` is a local HF directory (None: the bundled SmolLM2-135M-Instruct). Other keyword
    arguments are `EngineConfig` fields (`scheduler="sjf"`, `kv_cache_tokens=4096`,
    `max_num_batched_tokens=64`, `plugin_options={"sjf": {...}}`, ...).
    """

    def __init__(
        self, model: str | None = None, *, plugins: PluginManager | None = None, **settings: Any
    ) -> None:
        self.config = EngineConfig(model=str(model) if model else None, **settings)
        self.engine = Engine(self.config, plugins)
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        priorities: Sequence[int] | None = None,
        progress: bool = False,
    ) -> list[CompletionOutput]:
        """Generate a completion for each prompt (text or token ids), in prompt order.

        Its requests always use `output_kind="final"` (whatever `params` say: only the ends
        are returned, so the per-step text deltas would be built for nothing); drive the
        engine with `run()` for the deltas."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params_list = _per_prompt(params, len(prompts))
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params_list)):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            own = copy.deepcopy(p)
            own.output_kind = "final"
            r = Request(ids, own, priority=priorities[i] if priorities else 0)
            requests.append(r)
        texts = {r.request_id: "" for r in requests}
        for r in requests:
            self.engine.add_request(r)
        bar = tqdm(total=len(requests), disable=not progress, desc="generate")
        for out in self.run():  # one output per request: its whole text, finished
            texts[out.request_id] += out.text
            if out.finished:
                bar.update(1)
        bar.close()
        return [
            CompletionOutput(
                request_id=r.request_id,
                prompt=p if isinstance(p, str) else None,
                prompt_token_ids=list(r.prompt_token_ids),
                text=texts[r.request_id],
                token_ids=list(r.output_token_ids),
                finish_reason=r.finish_reason,
                logprobs=list(r.output_logprobs),
                num_cached_tokens=r.num_cached_tokens,
                num_preemptions=r.num_preemptions,
                error=r.error,
            )
            for r, p in zip(requests, prompts)
        ]

    def chat(
        self, conversations: list[list[dict]], params: SamplingParams | None = None
    ) -> list[CompletionOutput]:
        """Generate replies to chat conversations, formatted with the tokenizer's template."""
        prompts = [self.tokenizer.apply_chat_template(c) for c in conversations]
        return self.generate(prompts, params)

    def run(self) -> Iterator[RequestOutput]:
        """Step the engine until it has no work, yielding every text delta (the streaming
        view; they come from the engine's detokenizer, possibly a step or two behind)."""
        engine, detokenizer = self.engine, self.engine.detokenizer
        while engine.has_work() or detokenizer.busy():
            if engine.has_work():
                engine.step()
            yield from detokenizer.take(wait=not engine.has_work())

    def swap(self, slot: str, name: str, **options: Any):
        """Swap a plugin at the next step boundary; see `Engine.swap`. Returns a future that
        resolves to a `SwapResult` (slot, previous, active, the step it took effect at).

        `generate` blocks its thread while it steps the engine, so swap while requests run
        from another thread (thread-safe: the swap is queued and `generate`'s own loop applies
        it at its next step), or drive the engine yourself with `run()` and swap between the
        deltas it yields::

            done = threading.Thread(target=llm.generate, args=(prompts, params))
            done.start()
            llm.swap("scheduler", "sjf").result()  # applied by generate's loop
            done.join()

        The swap takes effect once, logged as `swapped scheduler: 'fcfs' -> 'sjf' at step N`.
        """
        return self.engine.swap(slot, name, **options)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _per_prompt(
    params: SamplingParams | Sequence[SamplingParams] | None, n: int
) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)
