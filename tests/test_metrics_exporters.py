"""The `prometheus` and `jsonl` metrics exporters, fed snapshots directly."""

from __future__ import annotations

import json
import threading

from pegboard.plugins.metrics.jsonl import JsonlExporter, JsonlOptions
from pegboard.plugins.metrics.prometheus import PrometheusExporter
from pegboard.sdk.slots import PluginContext
from pegboard.sdk.types import FinishReason, MetricsSnapshot, Request
from prometheus_client.parser import text_string_to_metric_families


def finished_request(n_out: int = 4, reason: FinishReason = FinishReason.LENGTH) -> Request:
    r = Request([1, 2, 3], arrival_time=100.0)
    r.first_scheduled_time = 100.5
    r.first_token_time = 101.0
    for t in range(n_out):
        r.append_token(10 + t)
    r.finish_reason = reason
    r.finished_time = 101.0 + 0.25 * (n_out - 1)
    return r


def samples(exporter: PrometheusExporter) -> dict[tuple[str, tuple], float]:
    text = exporter.render().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.pop("model_name") == exporter.model_name, s  # on every series
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_request_snapshot_counts_tokens_and_observes_latencies():
    exporter = PrometheusExporter()
    exporter.export_metrics(MetricsSnapshot("request", 0.0, request=finished_request(4)))
    s = samples(exporter)
    assert s[("pegboard:request_success_total", (("finished_reason", "length"),))] == 1
    assert s[("pegboard:prompt_tokens_total", ())] == 3
    assert s[("pegboard:generation_tokens_total", ())] == 4
    assert s[("pegboard:time_to_first_token_seconds_sum", ())] == 1.0
    assert s[("pegboard:request_queue_time_seconds_sum", ())] == 0.5
    assert s[("pegboard:e2e_request_latency_seconds_sum", ())] == 1.75
    # Three gaps of 0.25 s after the first token.
    assert s[("pegboard:time_per_output_token_seconds_sum", ())] == 0.25


def test_step_snapshot_sets_gauges_and_hit_rate_only_when_looked_up():
    exporter = PrometheusExporter()
    exporter.export_metrics(
        MetricsSnapshot("step", 0.0, num_running=3, num_waiting=2, batch_size=3, kv_usage=0.5)
    )
    s = samples(exporter)
    assert s[("pegboard:num_requests_running", ())] == 3
    assert s[("pegboard:num_requests_waiting", ())] == 2
    assert s[("pegboard:kv_cache_usage_perc", ())] == 0.5
    assert s[("pegboard:engine_steps_total", ())] == 1
    assert s[("pegboard:prefix_cache_hit_rate", ())] == 0
    exporter.export_metrics(
        MetricsSnapshot("step", 0.0, prefix_hit_tokens=30, prefix_query_tokens=40)
    )
    assert samples(exporter)[("pegboard:prefix_cache_hit_rate", ())] == 0.75


def test_two_exporters_have_separate_registries():
    a, b = PrometheusExporter(), PrometheusExporter()
    a.export_metrics(MetricsSnapshot("request", 0.0, request=finished_request()))
    assert samples(b)[("pegboard:generation_tokens_total", ())] == 0


def test_jsonl_writes_one_line_per_snapshot_from_many_threads(tmp_path):
    path = tmp_path / "m" / "metrics.jsonl"
    exporter = JsonlExporter(JsonlOptions(path=str(path), flush_interval_s=60))
    exporter.setup(PluginContext())

    def feed(k: int) -> None:
        for i in range(200):
            exporter.export_metrics(MetricsSnapshot("step", float(i), batch_size=k))

    threads = [threading.Thread(target=feed, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    exporter.export_metrics(MetricsSnapshot("request", 1.0, request=finished_request(2)))
    exporter.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 801
    assert sorted({line["batch_size"] for line in lines[:-1]}) == [0, 1, 2, 3]
    assert lines[-1]["request"]["num_output_tokens"] == 2
    assert lines[-1]["request"]["finish_reason"] == "length"


def test_jsonl_flushes_every_line_with_interval_zero(tmp_path):
    path = tmp_path / "metrics.jsonl"
    exporter = JsonlExporter(JsonlOptions(path=str(path), flush_interval_s=0))
    exporter.setup(PluginContext())
    exporter.export_metrics(MetricsSnapshot("step", 1.0, num_running=7))
    assert json.loads(path.read_text())["num_running"] == 7
    exporter.close()


def test_both_exporters_pass_the_conformance_kit(tmp_path):
    from pegboard.sdk.testing import check_metrics_exporter

    check_metrics_exporter(PrometheusExporter)
    check_metrics_exporter(JsonlExporter, {"path": str(tmp_path / "m.jsonl")})


def test_the_grafana_dashboard_queries_only_exported_metrics():
    import re
    from pathlib import Path

    dashboard = Path(__file__).parent.parent / "deploy/grafana/pegboard-dashboard.json"
    exprs = [t["expr"] for p in json.loads(dashboard.read_text())["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"pegboard:[a-z0-9_]+", e)}
    exported = {
        s.name
        for family in text_string_to_metric_families(PrometheusExporter().render().decode())
        for s in family.samples
    } | {f"pegboard:{n}" for n in ("request_success_total", "plugin_errors_total")}  # labelled
    assert used and used <= exported, used - exported
