"""The router's `/metrics`: per-worker load and health, routing decisions, retries, and the
routing policy's own counters (a cache-aware policy's hit estimate), on a private registry."""

from __future__ import annotations

from pegboard.core.router.pool import WorkerPool
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

PREFIX = "pegboard_router:"


class RouterMetrics:
    """Counters the request path bumps; gauges read from the pool when `/metrics` is asked."""

    def __init__(self, policy: str) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.policy = policy
        self.routed = Counter(
            PREFIX + "requests_routed_total",
            "Requests sent to each worker.",
            ("worker",),
            registry=r,
        )
        self.retried = Counter(
            PREFIX + "requests_retried_total",
            "Requests moved to another worker because this one could not take them.",
            ("worker",),
            registry=r,
        )
        self.unavailable = Counter(
            PREFIX + "requests_unavailable_total",
            "Requests answered 503: no healthy worker left.",
            registry=r,
        )
        self.healthy = Gauge(PREFIX + "worker_healthy", "1 if healthy.", ("worker",), registry=r)
        self.in_flight = Gauge(
            PREFIX + "worker_in_flight",
            "Requests the router has open on it.",
            ("worker",),
            registry=r,
        )
        self.reported_requests = Gauge(
            PREFIX + "worker_reported_requests",
            "Requests the worker last reported (GET /load).",
            ("worker",),
            registry=r,
        )
        self.reported_tokens = Gauge(
            PREFIX + "worker_reported_tokens",
            "Tokens the worker last reported in flight (GET /load).",
            ("worker",),
            registry=r,
        )
        self.policy_stat = Gauge(
            PREFIX + "policy_stat",
            "Counters of the routing policy.",
            ("policy", "stat"),
            registry=r,
        )
        self.cache_hit_estimate = Gauge(
            PREFIX + "cache_hit_estimate",
            "Cache-aware policy: characters of routed requests its trees matched / characters "
            "routed (the router's estimate of the workers' prefix hit rate).",
            registry=r,
        )

    def render(self, pool: WorkerPool, policy_stats: dict[str, float]) -> bytes:
        for w in pool.workers.values():
            self.healthy.labels(w.url).set(int(w.healthy))
            self.in_flight.labels(w.url).set(w.in_flight)
            self.reported_requests.labels(w.url).set(w.reported_requests or 0)
            self.reported_tokens.labels(w.url).set(w.reported_tokens or 0)
        for stat, value in policy_stats.items():
            self.policy_stat.labels(self.policy, stat).set(value)
        queries = policy_stats.get("cache_query_chars")
        if queries:
            self.cache_hit_estimate.set(policy_stats.get("cache_hit_chars", 0) / queries)
        return generate_latest(self.registry)
