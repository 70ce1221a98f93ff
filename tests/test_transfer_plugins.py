"""The `transfer` slot: byte runs, the per-request state machines, and both real backends
(Mooncake and NIXL over TCP loopback) through the conformance kit."""

from __future__ import annotations

import time

import pytest
import torch
from fixtures.transfer import (
    MOONCAKE_MISSING,
    NIXL_MISSING,
    TRANSFER_BACKENDS,
    mooncake_usable,
    nixl_usable,
)
from pegboard.sdk.testing import tiny_model_info
from pegboard.sdk.testing_transfer import check_transfer
from pegboard.sdk.transfer import (
    Bootstrap,
    KVPoll,
    KVReceiver,
    KVSender,
    KVTransferError,
    PoolLayout,
    byte_runs,
    page_runs,
)
from pegboard.sdk.types import KVPool, Request


def test_page_runs_merge_pages_contiguous_on_both_sides():
    assert page_runs([1, 2, 3, 6, 7], [4, 5, 6, 0, 1]) == [(1, 4, 3), (6, 0, 2)]
    assert page_runs([1, 2], [5, 4]) == [(1, 5, 1), (2, 4, 1)]


def test_byte_runs_cover_each_layer_key_and_value():
    info = tiny_model_info()
    src, dst = KVPool.allocate(info, 8, 4), KVPool.allocate(info, 8, 4)
    a, b = PoolLayout.of(src), PoolLayout.of(dst)
    runs = byte_runs(a, b, [1, 2, 5], [3, 4, 0])
    assert len(runs) == info.num_layers * 2 * 2
    assert runs[0].src == a.k[0] + a.page_bytes and runs[0].nbytes == 2 * a.page_bytes
    assert runs[1].dst == b.k[0] and runs[1].nbytes == a.page_bytes


def test_byte_runs_refuse_incompatible_layouts_and_pages_outside_the_pool():
    info = tiny_model_info()
    small = PoolLayout.of(KVPool.allocate(info, 8, 2))
    big = PoolLayout.of(KVPool.allocate(info, 8, 4))
    with pytest.raises(KVTransferError, match="page size"):
        byte_runs(small, big, [0], [0])
    with pytest.raises(KVTransferError, match="outside the pool"):
        byte_runs(big, big, [9], [0])


def test_sender_transfers_only_once_paired_and_computed():
    s = KVSender(Request([1, 2]), room=7, timeout=30)
    assert s.poll() is KVPoll.BOOTSTRAPPING
    s.input_ready([3], first_token=5)
    assert not s.ready
    s.on_bootstrap("decode", PoolLayout.of(KVPool.allocate(tiny_model_info(), 4, 4)), [1], 0)
    assert s.poll() is KVPoll.WAITING_FOR_INPUT and s.ready
    s.transferring(handle=object(), num_bytes=10, num_runs=1, timeout=30)
    assert s.poll() is KVPoll.TRANSFERRING
    s.succeed()
    assert s.poll() is KVPoll.SUCCESS


def test_sender_bootstrap_timeout_fails_with_a_message():
    s = KVSender(Request([1, 2]), room=7, timeout=0.0)
    time.sleep(0.001)
    assert s.poll() is KVPoll.FAILED
    assert "no decode engine registered" in str(s.failure_exception())


def test_receiver_waiting_timeout_names_the_prefill_engine():
    r = KVReceiver(Request([1]), room=3, timeout=30, bootstrap=Bootstrap("10.0.0.1", 8998, 3))
    r.waiting_timeout = 0.0
    r.init()
    time.sleep(0.001)
    assert r.poll() is KVPoll.FAILED
    assert "10.0.0.1:8998" in str(r.failure_exception())
    r.succeed(5)  # a late arrival does not resurrect a failed transfer
    assert r.poll() is KVPoll.FAILED


@pytest.mark.skipif(not mooncake_usable(), reason=MOONCAKE_MISSING)
def test_mooncake_conforms():
    from pegboard.plugins.transfer.mooncake import MooncakeTransfer

    check_transfer(MooncakeTransfer)


@pytest.mark.skipif(not nixl_usable(), reason=NIXL_MISSING)
def test_nixl_conforms(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.setenv("UCX_MODULES", "^ib")
    from pegboard.plugins.transfer.nixl import NixlTransfer

    check_transfer(NixlTransfer)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", TRANSFER_BACKENDS)
def test_backend_moves_device_memory(backend):
    from pegboard.core.plugin_manager import PluginManager

    cls = PluginManager().find("transfer", backend).cls
    check_transfer(cls, device="cuda")


def test_transfer_snapshots_count_bytes_results_and_durations_per_backend_and_role():
    from pegboard.plugins.metrics.prometheus import PrometheusExporter
    from pegboard.sdk.transfer import KVTransferRecord
    from pegboard.sdk.types import MetricsSnapshot
    from prometheus_client.parser import text_string_to_metric_families

    exporter = PrometheusExporter()

    def ended(**kw) -> None:
        fields = {"backend": "nixl", "role": "prefill", "ok": True, "bytes": 1000, "seconds": 0.002}
        record = KVTransferRecord(**{**fields, **kw})
        exporter.export_metrics(MetricsSnapshot("transfer", 1.0, transfer=record))

    ended()
    ended(bytes=500, seconds=0.3)
    ended(ok=False, bytes=0, seconds=0.0)
    ended(backend="mooncake", role="decode", bytes=64)
    samples = {}
    for family in text_string_to_metric_families(exporter.render().decode()):
        for s in family.samples:
            key = (s.name, s.labels.get("backend"), s.labels.get("role"), s.labels.get("result"))
            samples[key] = s.value
    nixl = ("nixl", "prefill")
    assert samples[("pegboard:kv_transfers_total", *nixl, "ok")] == 2
    assert samples[("pegboard:kv_transfers_total", *nixl, "failed")] == 1
    assert samples[("pegboard:kv_transfer_bytes_total", *nixl, None)] == 1500
    assert samples[("pegboard:kv_transfer_duration_seconds_count", *nixl, None)] == 2
    assert samples[("pegboard:kv_transfer_duration_seconds_sum", *nixl, None)] == 0.302
    assert samples[("pegboard:kv_transfer_bytes_total", "mooncake", "decode", None)] == 64
