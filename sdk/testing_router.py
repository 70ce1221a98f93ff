"""The conformance kit of the `router` slot (see `pegboard.sdk.testing` for the others).

    from pegboard.sdk.testing_router import check_router

    def test_my_policy_conforms():
        check_router(MyPolicy)

`check_router` creates the plugin as the router does (options validated, `setup`, registered
with a `PluginManager`, `route` called through pluggy) and drives it with seeded random worker
sets and requests: pools that shrink and grow, retries that exclude workers, loads from idle to
busy. It raises `ConformanceError` quoting the broken sentence of `pegboard.sdk.Router` or the
`route` hookspec.
"""

from __future__ import annotations

import random
from typing import Any

from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.routing import RouteRequest, WorkerLoad
from pegboard.sdk.slots import SLOTS, Plugin, PluginContext

__all__ = ["check_router"]

_PREFIXES = ["You are a helpful assistant. ", "Translate to French: ", "", "SYSTEM: be brief. "]


def _error(rule: str, detail: str = "") -> AssertionError:
    from pegboard.sdk.testing import ConformanceError

    return ConformanceError(f"{rule}" + (f"\n  case: {detail}" if detail else ""))


def _request(rng: random.Random, retry_of: tuple[str, ...]) -> RouteRequest:
    if rng.random() < 0.3:  # a token-id prompt, keyed one character per id
        ids = [rng.randrange(50000) for _ in range(rng.randint(1, 64))]
        text = "".join(map(chr, ids))
        body: dict[str, Any] = {"prompt": ids, "max_tokens": rng.randint(1, 64)}
    else:
        text = rng.choice(_PREFIXES) + " ".join(
            rng.choice(["a", "cat", "sat", "on", "the", "mat"]) for _ in range(rng.randint(0, 20))
        )
        body = {"prompt": text, "max_tokens": rng.randint(1, 64), "stream": rng.random() < 0.5}
    return RouteRequest("/v1/completions", text, body, retry_of)


def _workers(rng: random.Random, urls: list[str]) -> list[WorkerLoad]:
    busy = rng.random() < 0.5
    return [
        WorkerLoad(
            url,
            in_flight=rng.randint(0, 100 if busy else 3),
            reported_requests=rng.choice([None, rng.randint(0, 100)]),
            reported_tokens=rng.choice([None, rng.randint(0, 10**5)]),
        )
        for url in urls
    ]


def check_router(
    cls: type[Plugin], options: dict[str, Any] | None = None, seed: int = 0, rounds: int = 500
) -> None:
    """Check a routing policy against the `route` hookspec and the `Router` contract."""
    if cls.slot != "router":
        raise _error(
            f"the plugin must fill slot 'router' (subclass {SLOTS['router'].base.__name__})",
            f"{cls.__qualname__}.slot == {cls.slot!r}",
        )
    manager = PluginManager(entry_points=False)
    info = manager.add(cls, name=cls.name or cls.__name__.lower())
    plugin = manager.create("router", info.name, options)
    plugin.setup(PluginContext(engine={"workers": []}))
    manager.register(plugin)
    rng = random.Random(seed)
    pool = [f"http://127.0.0.1:{9000 + i}" for i in range(6)]
    try:
        for round_ in range(rounds):
            live = rng.sample(pool, rng.randint(1, len(pool)))
            failed = tuple(rng.sample(live, rng.randint(0, len(live) - 1)))
            offered = [w for w in _workers(rng, live) if w.url not in failed]
            request = _request(rng, failed)
            case = f"round {round_}: workers {[w.url for w in offered]}, retry_of {failed}"
            try:
                url = manager.hook.route(request=request, workers=offered)
            except Exception as e:
                raise _error(
                    "route returns the url of one of `workers` (it must not raise)",
                    f"{case}: {type(e).__name__}: {e}",
                ) from e
            if url not in {w.url for w in offered}:
                raise _error("route returns the url of one of `workers`", f"{case}: got {url!r}")
            if rng.random() < 0.1:  # the worker died: the policy forgets it
                gone = rng.choice(live)
                plugin.remove_worker(gone)
        stats = plugin.stats()
        if not isinstance(stats, dict) or not all(
            isinstance(k, str) and isinstance(v, (int, float)) for k, v in stats.items()
        ):
            raise _error("stats() returns counters: a dict of str to numbers", repr(stats))
    finally:
        manager.unregister(plugin)
        plugin.close()
