"""`draft`: a separate small model with the target's tokenizer drafts (SGLang's STANDALONE).

The draft model runs through pegboard's own model runner on a private paged KV pool: per
request, a shadow `Request` (in `request.plugin_state["draft"]`) holds the draft's page table
and how much of the context its KV covers. Each `propose` first re-syncs the shadow with the
request's tokens (the longest common prefix keeps its KV: accepted drafts stay, rejected ones
are recomputed), feeds what the draft has not seen, then drafts k tokens one forward each.
Greedy requests draft by argmax (a point mass); sampling requests draft by sampling the
draft's temperature distribution and hand it over for rejection sampling.

With the target's random weights (`--load-format dummy`) the draft's are random too, drawn the
same way: the target's own config directory as the draft gives a perfect draft (benchmarks of
the verify's overhead on real configs without their weights).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import pydantic
import torch
from pegboard.sdk.slots import PluginContext, Speculator
from pegboard.sdk.types import Drafts, KVPool, Request

STATE_KEY = "draft"


class DraftOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model_path: str | None = pydantic.Field(
        None, description="the draft model's HF directory (same tokenizer as the target)"
    )
    num_draft_tokens: int = pydantic.Field(4, ge=1, description="draft tokens per step at most")
    kv_cache_tokens: int = pydantic.Field(
        65536, ge=16, description="tokens the draft's own KV pool holds (all requests)"
    )
    attention: str = pydantic.Field(
        "auto", description="the draft's attention backend: torch, triton, auto (triton on CUDA)"
    )
    load_format: Literal["auto", "dummy"] | None = pydantic.Field(
        None,
        description="the draft's weights: auto (its checkpoint), dummy (random, drawn as the "
        "target's: the same config makes the same weights); default: the target's",
    )


class DraftModelSpeculator(Speculator):
    """Drafts with a small causal LM sharing the target's vocabulary."""

    name = "draft"
    Options = DraftOptions

    @classmethod
    def check_target(cls, config: dict, options: DraftOptions) -> None:
        if not options.model_path:
            raise ValueError(
                "needs a draft model: --draft-model-path DIR (or --speculative-draft-model-path)"
            )
        path = Path(options.model_path) / "config.json"
        try:
            draft = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read the draft model's {path}: {e}") from e
        if draft.get("vocab_size") != config.get("vocab_size"):
            raise ValueError(
                f"the draft model's vocabulary ({draft.get('vocab_size')} tokens, {path}) "
                f"differs from the target's ({config.get('vocab_size')}); a draft model must "
                "share the target's tokenizer"
            )

    def setup(self, ctx: PluginContext, previous=None) -> None:
        from pegboard.core.model_runner import ModelRunner

        o = self.options
        if not o.model_path:
            raise ValueError("the draft speculator needs model_path (--draft-model-path)")
        dtype = str(ctx.model.dtype).removeprefix("torch.") if ctx.model else "auto"
        load_format = o.load_format or ctx.engine.get("load_format") or "auto"
        self.runner = ModelRunner(
            o.model_path, dtype, str(ctx.device), None, progress=False, load_format=load_format
        )
        self.page_size = int(ctx.engine.get("page_size") or 16)
        num_pages = -(-o.kv_cache_tokens // self.page_size)
        pool = KVPool.allocate(self.runner.info, num_pages, self.page_size)
        self.runner.set_attention(_backend(o.attention, self.runner.info, pool))
        self._free = list(range(num_pages - 1, -1, -1))
        self._tracked: dict[int, Request] = {}  # requests holding draft pages

    def close(self) -> None:
        for r in list(self._tracked.values()):
            self._release(r)

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        self._release_finished()
        context = self.runner.info.max_model_len  # the draft's own, maybe below the target's
        limits = [
            max(min(k, self.options.num_draft_tokens, context - r.num_tokens), 0)
            for r, k in zip(requests, max_tokens)
        ]
        shadows = [self._sync(r, k) if k else None for r, k in zip(requests, limits)]
        drafts: list[list[int]] = [[] for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        for step in range(max(limits, default=0)):
            live = [i for i, s in enumerate(shadows) if s is not None and limits[i] > step]
            if not live:
                break
            batch_reqs = [shadows[i] for i in live]
            batch = self.runner.prepare(
                batch_reqs, [s.num_uncomputed_tokens for s in batch_reqs], self.page_size
            )
            logits = self.runner.forward(batch)
            for row, i in enumerate(live):
                s, r = shadows[i], requests[i]
                s.num_computed_tokens = s.num_tokens
                token, q = _choose(logits[row], r, s)
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
                s.token_ids.append(token)
        return [
            Drafts(d, probs=torch.stack(p) if p and len(p) == len(d) else None)
            for d, p in zip(drafts, probs)
        ]

    def _sync(self, r: Request, k: int) -> Request | None:
        """The request's shadow, its tokens set to the request's and its KV trimmed to the
        common prefix, with pages for `k` more tokens; None if the draft pool is full."""
        s = r.plugin_state.get(STATE_KEY)
        if s is None:
            s = Request(list(r.token_ids), request_id=f"{r.request_id}/draft")
            r.plugin_state[STATE_KEY] = s
            self._tracked[id(r)] = r
        common = 0
        for a, b in zip(s.token_ids, r.token_ids):
            if a != b:
                break
            common += 1
        s.token_ids = list(r.token_ids)
        s.num_computed_tokens = min(s.num_computed_tokens, common, len(r.token_ids) - 1)
        need = -(-(len(r.token_ids) + k - 1) // self.page_size) - len(s.page_table)
        if need > len(self._free):
            return None
        for _ in range(max(need, 0)):
            s.page_table.append(self._free.pop())
        return s

    def _release_finished(self) -> None:
        for r in [r for r in self._tracked.values() if r.finished]:
            self._release(r)

    def _release(self, r: Request) -> None:
        s = r.plugin_state.pop(STATE_KEY, None)
        self._tracked.pop(id(r), None)
        if s is not None:
            self._free.extend(reversed(s.page_table))
            s.page_table = []
            self.runner.page_tables.forget(s)  # the runner's row of its page table

    @property
    def num_free_pages(self) -> int:
        return len(self._free)


def _choose(logits: torch.Tensor, r: Request, shadow: Request) -> tuple[int, torch.Tensor | None]:
    """The draft token: argmax for a greedy request; otherwise a sample from the draft's
    temperature distribution (from a stream seeded like the request), returned with it."""
    if r.params.greedy:
        return int(logits.argmax()), None
    gen = shadow.plugin_state.get("generator")
    if gen is None:
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(r.params.seed if r.params.seed is not None else r.seq)
        shadow.plugin_state["generator"] = gen
    q = (logits.float() / r.params.temperature).softmax(dim=-1)
    return int(torch.multinomial(q, 1, generator=gen)), q


def _backend(name: str, info, pool: KVPool):
    if name == "auto":
        name = "triton" if info.device.type == "cuda" else "torch"
    if name == "triton":
        from pegboard.plugins.kernels.attention_triton import TritonAttentionBackend

        return TritonAttentionBackend(info, pool)
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend

    return TorchAttentionBackend(info, pool)
