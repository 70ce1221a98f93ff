"""The `prometheus` metrics exporter: engine gauges, request counters and latency histograms on
its own `CollectorRegistry`, which `pegboard serve` exposes at `GET /metrics`.

Names follow vLLM's (`vllm:` → `pegboard:`) where vLLM has one — `request_success_total
{finished_reason}`, `kv_cache_usage_perc` (a fraction, as vLLM's despite the name),
`prefix_cache_queries_total` / `prefix_cache_hits_total` — so existing dashboards translate by
prefix; `gen_throughput` is SGLang's generation-throughput gauge. Every series carries a
`model_name` label (the `model_name` option, else the engine's model). Latencies come from the
request's `time.monotonic()` stamps: arrival, first scheduled, first token, finished. PD
disaggregation's KV transfers (`kind="transfer"` snapshots) count per `backend` and `role`.
"""

from __future__ import annotations

import collections

import pydantic
from pegboard.sdk.slots import MetricsExporter, Plugin, PluginContext
from pegboard.sdk.types import MetricsSnapshot, Request
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

PREFIX = "pegboard:"
#: Seconds; dense below one second, where first-token and per-token latencies live.
LATENCY_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5,
    0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0,
)  # fmt: skip
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SPEC_LENGTH_BUCKETS = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0)
#: Seconds of step history `gen_throughput` averages over.
THROUGHPUT_WINDOW_S = 5.0


class PrometheusOptions(pydantic.BaseModel):
    """Options of the `prometheus` exporter."""

    model_config = pydantic.ConfigDict(extra="forbid")

    model_name: str = pydantic.Field(
        "", description="the model_name label of every series (default: the engine's model)"
    )


class PrometheusExporter(MetricsExporter):
    """Exports every snapshot to Prometheus metrics; `render()` gives the text exposition
    that `pegboard serve` answers `GET /metrics` with."""

    name = "prometheus"
    Options = PrometheusOptions

    def __init__(self, options=None) -> None:
        super().__init__(options)
        self.model_name = self.options.model_name or "pegboard"
        self.registry = CollectorRegistry(auto_describe=True)
        self._plugin_errors: dict[tuple[str, str], int] = {}
        self._decode = collections.deque()  # (timestamp, decode tokens, step time) per step
        self._build()

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        name = self.options.model_name or ctx.engine.get("model_name")
        if name and name != self.model_name:
            self.model_name = name
            self.registry = CollectorRegistry(auto_describe=True)
            self._build()

    def _build(self) -> None:
        r, model = self.registry, self.model_name

        def counter(name: str, doc: str, labels: tuple[str, ...] = ()):
            c = Counter(PREFIX + name, doc, ("model_name", *labels), registry=r)
            return c if labels else c.labels(model_name=model)

        def gauge(name: str, doc: str):
            return Gauge(PREFIX + name, doc, ("model_name",), registry=r).labels(model_name=model)

        def histogram(name: str, doc: str, buckets, labels: tuple[str, ...] = ()):
            h = Histogram(PREFIX + name, doc, ("model_name", *labels), buckets=buckets, registry=r)
            return h if labels else h.labels(model_name=model)

        self.requests = counter("request_success_total", "Finished requests.", ("finished_reason",))
        self.plugin_errors = counter(
            "plugin_errors_total",
            "Plugin exceptions and contract violations (the engine names the plugin in its log).",
            ("slot", "plugin"),
        )
        self.prompt_tokens = counter("prompt_tokens_total", "Prompt tokens of finished requests.")
        self.generation_tokens = counter(
            "generation_tokens_total", "Generated tokens of finished requests."
        )
        self.preemptions = counter("num_preemptions_total", "Requests preempted (KV recomputed).")
        self.steps = counter("engine_steps_total", "Engine steps run.")
        self.running = gauge("num_requests_running", "Requests holding KV.")
        self.waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled.")
        self.batch_size = gauge("batch_size", "Requests scheduled in the last step.")
        self.kv_usage = gauge("kv_cache_usage_perc", "Fraction of KV pages in use (0 to 1).")
        self.eplb_balancedness = gauge(
            "eplb_balancedness",
            "MoE models: mean/max per-rank expert tokens of the live expert placement (1 = even).",
        )
        self.gen_throughput = gauge(
            "gen_throughput", f"Decode tokens per second over the last {THROUGHPUT_WINDOW_S:g} s."
        )
        self.prefix_queries = counter(
            "prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache."
        )
        self.prefix_hits = counter(
            "prefix_cache_hits_total", "Prompt tokens served from the prefix cache."
        )
        self.prefix_hit_rate = gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens served from the prefix cache / tokens looked up.",
        )
        self._prefix_seen = (0, 0)  # the cache's cumulative (hits, queries) at the last step
        self.ttft = histogram(
            "time_to_first_token_seconds", "Arrival to first generated token.", LATENCY_BUCKETS
        )
        self.tpot = histogram(
            "time_per_output_token_seconds",
            "Mean time between output tokens after the first, per request.",
            LATENCY_BUCKETS,
        )
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to finish.", LATENCY_BUCKETS)
        self.queue_time = histogram(
            "request_queue_time_seconds", "Arrival to first scheduled.", LATENCY_BUCKETS
        )
        self.step_time = histogram("step_duration_seconds", "Engine step wall time.", STEP_BUCKETS)
        self.request_prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt length of finished requests.", TOKEN_BUCKETS
        )
        self.request_generation_tokens = histogram(
            "request_generation_tokens", "Output length of finished requests.", TOKEN_BUCKETS
        )
        # Speculative decoding (SGLang's spec_accept_length), per finished request.
        self.spec_verify_steps = counter("spec_verify_steps_total", "Speculative verify steps.")
        self.spec_draft_tokens = counter("spec_draft_tokens_total", "Draft tokens proposed.")
        self.spec_accepted_tokens = counter(
            "spec_accepted_tokens_total", "Draft tokens the target accepted."
        )
        # The speculation on/off switch (`core/speculative/switch.py`), from step snapshots.
        off = counter(
            "spec_switch_off_steps_total",
            "Steps the speculation switch ran without drafts, by rule (accept_rate, batch_size, "
            "speed).",
            ("reason",),
        )
        self._switch_counters = {
            "spec_switch_off_steps_accept_rate": off.labels(model, "accept_rate"),
            "spec_switch_off_steps_batch_size": off.labels(model, "batch_size"),
            "spec_switch_off_steps_speed": off.labels(model, "speed"),
            "spec_switch_turned_off": counter(
                "spec_switch_turned_off_total",
                "Times the acceptance (or speed) rule turned speculation off for a cooldown.",
            ),
        }
        self._switch_seen: dict[str, float] = {}  # their cumulative counts at the last step
        self.spec_accept_length = histogram(
            "spec_accept_length",
            "Tokens per verify step (accepted drafts + 1) of finished requests.",
            SPEC_LENGTH_BUCKETS,
        )

        # PD disaggregation: one observation per request and side (`KVTransferRecord`).
        self.kv_transfers = counter(
            "kv_transfers_total",
            "KV transfers ended, by result (ok, failed).",
            ("backend", "role", "result"),
        )
        self.kv_transfer_bytes = counter(
            "kv_transfer_bytes_total",
            "KV bytes of finished transfers: sent (role prefill) or received (role decode).",
            ("backend", "role"),
        )
        self.kv_transfer_seconds = histogram(
            "kv_transfer_duration_seconds",
            "Prefill: posting a request's KV copies to their completion; decode: registering "
            "its pages to the KV's arrival.",
            LATENCY_BUCKETS,
            ("backend", "role"),
        )

    def export_metrics(self, snapshot: MetricsSnapshot) -> None:
        if snapshot.kind == "step":
            self._observe_step(snapshot)
        elif snapshot.kind == "request" and snapshot.request is not None:
            self._observe_request(snapshot.request)
        elif snapshot.kind == "transfer" and snapshot.transfer is not None:
            self._observe_transfer(snapshot.transfer)

    def _observe_transfer(self, t: dict) -> None:
        labels = (self.model_name, t["backend"], t["role"])
        self.kv_transfers.labels(*labels, "ok" if t["ok"] else "failed").inc()
        if t["ok"]:
            self.kv_transfer_bytes.labels(*labels).inc(t["bytes"])
            self.kv_transfer_seconds.labels(*labels).observe(t["seconds"])

    def _observe_step(self, s: MetricsSnapshot) -> None:
        self.steps.inc()
        self.running.set(s.num_running)
        self.waiting.set(s.num_waiting)
        idle = s.num_running == 0 and s.num_waiting == 0
        self.batch_size.set(0 if idle else s.batch_size)  # the engine stops stepping when idle
        self.kv_usage.set(s.kv_usage)
        if "eplb_balancedness" in s.extra:
            self.eplb_balancedness.set(s.extra["eplb_balancedness"])
        self.step_time.observe(s.step_time_s)
        self.gen_throughput.set(0.0 if idle else self._throughput(s))
        if s.num_preempted:
            self.preemptions.inc(s.num_preempted)
        if s.prefix_query_tokens > 0:
            self.prefix_hit_rate.set(s.prefix_hit_tokens / s.prefix_query_tokens)
        hits, queries = self._prefix_seen
        if s.prefix_query_tokens > queries:
            self.prefix_queries.inc(s.prefix_query_tokens - queries)
            self.prefix_hits.inc(max(s.prefix_hit_tokens - hits, 0))
        if s.prefix_query_tokens >= queries:  # a swapped-in cache starts from zero again
            self._prefix_seen = (s.prefix_hit_tokens, s.prefix_query_tokens)
        else:
            self._prefix_seen = (0, 0)
        self._observe_switch(s.extra)
        for key, count in s.plugin_errors.items():
            seen = self._plugin_errors.get(key, 0)
            if count > seen:
                self.plugin_errors.labels(self.model_name, *key).inc(count - seen)
                self._plugin_errors[key] = count

    def _observe_switch(self, extra: dict[str, float]) -> None:
        """The speculation switch's cumulative counts (`Speculation.metrics`) as increments."""
        for name, counter in self._switch_counters.items():
            if name in extra:
                step = extra[name] - self._switch_seen.get(name, 0)
                if step > 0:
                    counter.inc(step)
                self._switch_seen[name] = extra[name]

    def _throughput(self, s: MetricsSnapshot) -> float:
        """Decode tokens per second over the steps of the last `THROUGHPUT_WINDOW_S`."""
        window = self._decode
        window.append((s.timestamp, s.num_decode_tokens, s.step_time_s))
        while window and window[0][0] < s.timestamp - THROUGHPUT_WINDOW_S:
            window.popleft()
        span = max(s.timestamp - window[0][0] + window[0][2], s.step_time_s, 1e-9)
        return sum(n for _, n, _ in window) / span

    def _observe_request(self, r: Request) -> None:
        reason = r.finish_reason.value if r.finish_reason is not None else "unknown"
        self.requests.labels(model_name=self.model_name, finished_reason=reason).inc()
        self.prompt_tokens.inc(r.num_prompt_tokens)
        self.generation_tokens.inc(r.num_output_tokens)
        self.request_prompt_tokens.observe(r.num_prompt_tokens)
        self.request_generation_tokens.observe(r.num_output_tokens)
        if r.first_scheduled_time is not None:
            self.queue_time.observe(r.first_scheduled_time - r.arrival_time)
        if r.first_token_time is not None:
            self.ttft.observe(r.first_token_time - r.arrival_time)
            if r.finished_time is not None and r.num_output_tokens > 1:
                decode = r.finished_time - r.first_token_time
                self.tpot.observe(decode / (r.num_output_tokens - 1))
        if r.finished_time is not None:
            self.e2e.observe(r.finished_time - r.arrival_time)
        if r.num_spec_steps:
            self.spec_verify_steps.inc(r.num_spec_steps)
            self.spec_draft_tokens.inc(r.num_draft_tokens)
            self.spec_accepted_tokens.inc(r.num_accepted_tokens)
            self.spec_accept_length.observe(1 + r.num_accepted_tokens / r.num_spec_steps)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
