"""The router's `/metrics`: per-worker load and health, routing decisions, retries, and the
routing policy's own counters (a cache-aware policy's hit estimate), on a private registry."""

from __future__ import annotations

from collections.abc import Callable

from pegboard.core.router.pool import Worker, WorkerPool
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

PREFIX = "pegboard_router:"

#: Per-worker gauges, read from the pool when `/metrics` is asked: name, help, value.
WORKER_GAUGES: tuple[tuple[str, str, Callable[[Worker], float]], ...] = (
    ("worker_healthy", "1 if healthy.", lambda w: int(w.healthy)),
    ("worker_in_flight", "Requests the router has open on it.", lambda w: w.in_flight),
    (
        "worker_reported_requests",
        "Requests the worker last reported (GET /load).",
        lambda w: w.reported_requests or 0,
    ),
    (
        "worker_reported_tokens",
        "Tokens the worker last reported in flight (GET /load).",
        lambda w: w.reported_tokens or 0,
    ),
)


class RouterMetrics:
    """Counters the request path bumps; gauges read from the pools when `/metrics` is asked."""

    def __init__(self, policy: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.policy = policy

        def counter(name: str, doc: str, labels: tuple[str, ...] = ("worker",)) -> Counter:
            return Counter(PREFIX + name, doc, labels, registry=r)

        def gauge(name: str, doc: str, labels: tuple[str, ...] = ("worker",)) -> Gauge:
            return Gauge(PREFIX + name, doc, labels, registry=r)

        self.routed = counter("requests_routed_total", "Requests sent to each worker.")
        self.retried = counter(
            "requests_retried_total",
            "Requests moved to another worker because this one could not take them.",
        )
        self.unavailable = counter(
            "requests_unavailable_total", "Requests answered 503: no healthy worker left.", ()
        )
        self.worker_gauges = [(gauge(name, doc), value) for name, doc, value in WORKER_GAUGES]
        self.policy_stat = gauge(
            "policy_stat", "Counters of the routing policy.", ("policy", "stat")
        )
        self.cache_hit_estimate = gauge(
            "cache_hit_estimate",
            "Cache-aware policy: characters of routed requests its trees matched / characters "
            "routed (the router's estimate of the workers' prefix hit rate).",
            (),
        )

    def render(self, pools: list[WorkerPool], policy_stats: dict[str, float]) -> bytes:
        for pool in pools:
            for w in pool.workers.values():
                for g, value in self.worker_gauges:
                    g.labels(w.url).set(value(w))
        for stat, value in policy_stats.items():
            self.policy_stat.labels(self.policy, stat).set(value)
        queries = policy_stats.get("cache_query_chars")
        if queries:
            self.cache_hit_estimate.set(policy_stats.get("cache_hit_chars", 0) / queries)
        return generate_latest(self.registry)
