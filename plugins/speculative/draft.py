"""`draft`: a separate small model with the target's tokenizer drafts (SGLang's STANDALONE).

The draft model runs through pegboard's own model runner on a private paged KV pool: per
request, a shadow `Request` (in `request.plugin_state["draft"]`) holds the draft's page table
and how much of the context its KV covers. Each `propose` first re-syncs the shadow with the
request's tokens (the longest common prefix keeps its KV: accepted drafts stay, rejected ones
are recomputed), feeds what the draft has not seen, then drafts k tokens one forward each,
every request in the same forward (decode CUDA graphs where the target has them on).
Greedy requests draft by argmax (a point mass); sampling requests draft by sampling the
draft's temperature distribution and hand it over for rejection sampling. With `topk` > 1 the
draft grows a tree instead (EAGLE-2's way, `tree_search`; the greedy chain is its first path),
one forward per depth with a tree mask; its nodes are point masses for every request.

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
from pegboard.plugins.speculative.head_kv import attention_backend
from pegboard.plugins.speculative.tree_search import DraftTree
from pegboard.sdk.slots import PluginContext, Speculator
from pegboard.sdk.types import Drafts, KVPool, Request

STATE_KEY = "draft"


class DraftOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model_path: str | None = pydantic.Field(
        None, description="the draft model's HF directory (same tokenizer as the target)"
    )
    num_draft_tokens: int = pydantic.Field(4, ge=1, description="draft tokens per step at most")
    topk: int = pydantic.Field(1, ge=1, description="children per expanded tree node (1: chain)")
    num_steps: int | None = pydantic.Field(
        None, ge=1, description="a tree's depth (default: num_draft_tokens)"
    )
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
        # A chain's catch-up forward runs 1 or 2 tokens (the last draft, the target's token).
        self.runner.set_speculation([2] if o.topk == 1 else [])
        max_requests = int(ctx.engine.get("max_running_requests") or 0)
        self.runner.set_attention(  # decode (and catch-up) CUDA graphs where the target has them
            attention_backend(o.attention, self.runner.info, pool),
            cuda_graph_max_bs=min(int(ctx.engine.get("cuda_graph_max_bs") or 0), max_requests),
            max_requests=max_requests,
        )
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
        if self.options.topk > 1:
            return self._propose_trees(requests, limits, context)
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
            greedy = logits.argmax(dim=-1).tolist()  # one device sync for every request
            for row, i in enumerate(live):
                s, r = shadows[i], requests[i]
                s.num_computed_tokens = s.num_tokens
                token, q = (greedy[row], None) if r.params.greedy else _choose(logits[row], r, s)
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q)
                s.token_ids.append(token)
        return [
            Drafts(d, probs=torch.stack(p) if p and len(p) == len(d) else None)
            for d, p in zip(drafts, probs)
        ]

    def _propose_trees(
        self, requests: list[Request], limits: list[int], context: int
    ) -> list[Drafts]:
        """EAGLE-2 trees grown with the draft model (`tree_search`): one forward per depth for
        every request's frontier, each node attending to the context and its ancestors. The
        tree's KV is dropped afterwards (the next sync recomputes what was accepted)."""
        o = self.options
        topk = o.topk
        depth = {}
        for i, (r, k) in enumerate(zip(requests, limits)):
            d = min(o.num_steps or o.num_draft_tokens, k)
            while d > 1 and r.num_tokens + topk * (d - 1) > context:
                d -= 1
            depth[i] = d
        shadows = {
            i: s
            for i, (r, k) in enumerate(zip(requests, limits))
            if k and (s := self._sync(r, topk * (depth[i] - 1) + 1)) is not None
        }
        trees = {i: DraftTree(topk) for i in shadows}
        start = {i: s.num_tokens for i, s in shadows.items()}  # the context's length
        fed: dict[int, list[int]] = {i: [] for i in shadows}  # tree nodes in KV order
        frontier: dict[int, list[int]] = {i: [-1] for i in shadows}  # -1: the last token
        for d in range(1, max(depth.values(), default=0) + 1):
            live = [i for i in shadows if d <= depth[i] and frontier[i]]
            if not live:
                break
            if d > 1:
                for i in live:
                    shadows[i].token_ids.extend(trees[i].tokens[f] for f in frontier[i])
            batch = self.runner.prepare(
                [shadows[i] for i in live],
                [shadows[i].num_uncomputed_tokens for i in live],
                self.page_size,
            )
            if d > 1:
                _tree_rows(batch, [(trees[i], fed[i], frontier[i], start[i]) for i in live])
            logits = self.runner.forward(batch).float().log_softmax(-1)
            values, ids = logits.topk(topk, dim=-1)
            row = 0
            for i in live:
                s, tree = shadows[i], trees[i]
                s.num_computed_tokens = s.num_tokens
                new = []
                for f in frontier[i]:
                    new += tree.add_children(f, values[row].tolist(), ids[row].tolist())
                    row += 1
                if d > 1:
                    fed[i] += frontier[i]
                frontier[i] = tree.frontier(new)
        out = []
        for i in range(len(requests)):
            if i not in shadows:
                out.append(Drafts([]))
                continue
            s = shadows[i]
            del s.token_ids[start[i] :]  # the tree's KV is not the context's
            s.num_computed_tokens = start[i]
            out.append(trees[i].drafts(limits[i]))
        return out

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


def _choose(logits: torch.Tensor, r: Request, shadow: Request) -> tuple[int, torch.Tensor]:
    """A sampling request's draft token: a sample from the draft's temperature distribution
    (from a stream seeded like the request), returned with it."""
    gen = shadow.plugin_state.get("generator")
    if gen is None:
        gen = torch.Generator(device=logits.device)
        gen.manual_seed(r.params.seed if r.params.seed is not None else r.seq)
        shadow.plugin_state["generator"] = gen
    q = (logits.float() / r.params.temperature).softmax(dim=-1)
    return int(torch.multinomial(q, 1, generator=gen)), q


def _tree_rows(batch, requests: list[tuple[DraftTree, list[int], list[int], int]]) -> None:
    """A tree-drafting forward: per request (its tree, the nodes already in its KV, the
    frontier being fed, the context's length), every frontier row's logits, its position by
    depth, and a mask over the fed nodes: its ancestors and itself."""
    positions, masks, rows, end = [], [], [], 0
    for (tree, fed, frontier, start), q in zip(requests, batch.query_lens_cpu):
        masks.append(tree.ancestor_mask(fed, frontier))
        positions += [start - 1 + tree.depths[f] for f in frontier]
        rows += range(end + q - len(frontier), end + q)
        end += q
    device = batch.input_ids.device
    index = torch.tensor(rows, dtype=torch.int64, device=device)
    batch.positions = batch.positions.clone()
    batch.positions[index] = torch.tensor(positions, dtype=torch.int64, device=device)
    batch.tree_masks = masks
    batch.logits_rows = index
