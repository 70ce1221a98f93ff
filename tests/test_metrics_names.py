"""Metrics as vLLM names them (issue 10, item 14): `request_success_total{finished_reason}`,
`kv_cache_usage_perc`, prefix-cache query/hit counters, a `model_name` label on every series,
SGLang's `gen_throughput`, and `batch_size` back to 0 once the engine is idle."""

from __future__ import annotations

from pegboard.core.llm import LLM
from pegboard.plugins.metrics.prometheus import PrometheusExporter, PrometheusOptions
from pegboard.sdk.slots import PluginContext
from pegboard.sdk.types import MetricsSnapshot, SamplingParams
from prometheus_client.parser import text_string_to_metric_families


def series(exporter: PrometheusExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(exporter.render().decode()):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(exporter: PrometheusExporter, name: str) -> float:
    [sample] = series(exporter)[f"pegboard:{name}"]
    return sample.value


def test_every_series_has_the_model_name_from_the_option_or_the_engine():
    named = PrometheusExporter(PrometheusOptions(model_name="llama-8b"))
    named.setup(PluginContext(engine={"model_name": "/models/x"}))
    from_engine = PrometheusExporter()
    from_engine.setup(PluginContext(engine={"model_name": "/models/x"}))
    for exporter, name in ((named, "llama-8b"), (from_engine, "/models/x")):
        exporter.export_metrics(MetricsSnapshot("step", 1.0, num_running=1))
        samples = [s for group in series(exporter).values() for s in group]
        assert samples and all(s.labels.get("model_name") == name for s in samples)


def test_vllm_names_and_prefix_cache_counters_follow_the_cumulative_stats():
    exporter = PrometheusExporter()
    exporter.export_metrics(MetricsSnapshot("step", 1.0, kv_usage=0.25, num_running=1,
                                            prefix_hit_tokens=30, prefix_query_tokens=40))  # fmt: skip
    exporter.export_metrics(MetricsSnapshot("step", 2.0, kv_usage=0.5, num_running=1,
                                            prefix_hit_tokens=30, prefix_query_tokens=100))  # fmt: skip
    assert value(exporter, "kv_cache_usage_perc") == 0.5
    assert value(exporter, "prefix_cache_queries_total") == 100
    assert value(exporter, "prefix_cache_hits_total") == 30
    assert value(exporter, "prefix_cache_hit_rate") == 0.3
    names = set(series(exporter))
    assert not {"pegboard:kv_cache_usage_ratio", "pegboard:requests_total"} & names


def test_gen_throughput_counts_decode_tokens_per_second_and_idle_zeroes_it_and_batch_size():
    exporter = PrometheusExporter()
    for t in range(1, 5):  # four 0.1 s steps of 8 decodes, 0.1 s apart
        exporter.export_metrics(MetricsSnapshot("step", t * 0.1, num_running=8, batch_size=8,
                                                num_decode_tokens=8, step_time_s=0.1))  # fmt: skip
    assert value(exporter, "gen_throughput") == 32 / 0.4
    assert value(exporter, "batch_size") == 8
    # The step that finished the last request: its batch ran, but nothing is left.
    exporter.export_metrics(MetricsSnapshot("step", 0.5, batch_size=8, num_decode_tokens=8,
                                            step_time_s=0.1))  # fmt: skip
    assert value(exporter, "batch_size") == 0 and value(exporter, "gen_throughput") == 0


def test_an_engine_that_finished_its_work_reports_an_idle_batch(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu", metrics=["prometheus"])
    try:
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=3, temperature=0.0))
        [prom] = llm.engine.plugins.active_all("metrics")
        assert value(prom, "batch_size") == 0 and value(prom, "num_requests_running") == 0
        [ok] = [s for s in series(prom)["pegboard:request_success_total"]]
        assert ok.labels["finished_reason"] == "length" and ok.value == 1
        assert ok.labels["model_name"] == str(tiny_llama_dir)
    finally:
        llm.close()
