"""`bench offline`'s plugin_layer figure reports what checking plugins' results costs per step
(issue 10, item 1)."""

from __future__ import annotations

import pytest
from pegboard.core.bench.contract_cost import contract_check_us
from pegboard.core.bench.dispatch import plugin_layer_share


def test_plugin_layer_reports_the_contract_checks_per_batch_size_and_their_share():
    layer = plugin_layer_share(0.010)
    checks = layer["contract_check_us"]
    assert set(checks) == {f"batch_{n}{same}" for n in (1, 32, 256) for same in ("", "_same_batch")}
    assert all(0 < us < 10_000 for us in checks.values())
    assert layer["contract_check_share_pct_batch_256"] == pytest.approx(
        100 * checks["batch_256"] * 1e-6 / 0.010, rel=0.01
    )


def test_checking_one_request_costs_microseconds_not_milliseconds():
    # A loose bound for a shared, loaded CI machine; bench reports the figure itself.
    assert contract_check_us(1, repeat=50) < 1_000
