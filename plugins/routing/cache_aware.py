"""Cache aware: send a request where its prefix was sent before, unless that unbalances load.

SGLang router's policy. Per worker, an approximate radix tree of the routing keys it was sent
(`PrefixTree`). For each request:

1. Load guard: if the busiest and the idlest worker differ by more than
   `balance_abs_threshold` open requests AND the busiest has more than
   `balance_rel_threshold` times the idlest's, the request goes to the least loaded worker.
2. Otherwise, the worker whose tree matches the longest prefix of the request's key, if the
   match covers more than `cache_threshold` of the key (ties: the less loaded).
3. Otherwise (a miss), the least loaded worker — not the one with the smallest tree: a worker
   busy with unique requests has a small tree, and sending every miss there is the hot-spot
   failure of sglang#14305.

The chosen worker's tree then holds the key. Load is `WorkerLoad.requests`, then `.tokens`.
"""

from __future__ import annotations

import pydantic
from pegboard.plugins.routing.prefix_tree import PrefixTree
from pegboard.sdk.routing import RouteRequest, WorkerLoad
from pegboard.sdk.slots import Router


class CacheAwareOptions(pydantic.BaseModel):
    """Options of `CacheAwareRouter` (defaults as SGLang's router)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    cache_threshold: float = pydantic.Field(
        0.3,
        ge=0.0,
        le=1.0,
        description="fraction of a request's key a worker's tree must match for the request "
        "to follow its cache; below it the request goes to the least loaded worker",
    )
    balance_abs_threshold: int = pydantic.Field(
        64,
        ge=0,
        description="the load guard trips when the open-request gap between the busiest and "
        "the idlest worker exceeds this AND their ratio exceeds balance_rel_threshold",
    )
    balance_rel_threshold: float = pydantic.Field(
        1.5, ge=1.0, description="the ratio half of the load guard (see balance_abs_threshold)"
    )
    max_tree_chars: int = pydantic.Field(
        1 << 24, ge=1, description="characters kept per worker's tree before LRU eviction"
    )


def _load(worker: WorkerLoad) -> tuple[int, int]:
    return worker.requests, worker.tokens


class CacheAwareRouter(Router):
    """Prefix affinity with SGLang's load guard (see the module docstring)."""

    name = "cache_aware"
    Options = CacheAwareOptions

    def setup(self, ctx, previous=None) -> None:
        self.trees: dict[str, PrefixTree] = {}
        self.counts = {"cache": 0, "miss": 0, "balance": 0, "hit_chars": 0, "query_chars": 0}

    def route(self, request: RouteRequest, workers: list[WorkerLoad]) -> str:
        o = self.options
        text = request.text
        idlest = min(workers, key=_load)
        busiest = max(w.requests for w in workers)
        gap = busiest - idlest.requests
        if gap > o.balance_abs_threshold and busiest > idlest.requests * o.balance_rel_threshold:
            chosen, decision = idlest, "balance"
        else:
            matched = {w.url: self._tree(w.url).match(text) for w in workers}
            best = max(workers, key=lambda w: (matched[w.url], -w.requests, -w.tokens))
            hit = bool(text) and matched[best.url] / len(text) > o.cache_threshold
            chosen, decision = (best, "cache") if hit else (idlest, "miss")
        tree = self._tree(chosen.url)
        self.counts["hit_chars"] += tree.match(text)
        self.counts["query_chars"] += len(text)
        self.counts[decision] += 1
        tree.insert(text)
        tree.evict(o.max_tree_chars)
        return chosen.url

    def _tree(self, url: str) -> PrefixTree:
        tree = self.trees.get(url)
        if tree is None:
            tree = self.trees[url] = PrefixTree()
        return tree

    def remove_worker(self, url: str) -> None:
        self.trees.pop(url, None)

    def stats(self) -> dict[str, float]:
        c = self.counts
        return {
            "cache_routed": c["cache"],
            "miss_routed": c["miss"],
            "balance_routed": c["balance"],
            "cache_hit_chars": c["hit_chars"],
            "cache_query_chars": c["query_chars"],
            "tree_chars": sum(t.chars for t in self.trees.values()),
        }
