"""The plugin layer's share of an engine step: what calling hooks through pluggy costs.

The step loop calls three hooks through pluggy per step (`schedule`, `allocate_kv`, `sample`);
`export_metrics` consumers are called directly, one by one, and every per-layer call goes
through the object `attention_kernel` returned (DESIGN.md §2). The cost of the plugin layer is
therefore pluggy's dispatch, measured here against a direct call of the same function with the
same keyword arguments, in a plugin manager carrying pegboard's own hookspecs.
"""

from __future__ import annotations

import time

import pluggy
from pegboard.core import hookspecs
from pegboard.core.hookspecs import hookimpl

#: The hooks the engine calls through pluggy on every step.
PER_STEP_HOOKS = ("schedule", "allocate_kv", "sample")


class _Instant:
    """One implementation of each per-step hook that returns at once."""

    @hookimpl
    def schedule(self, waiting, running, budget, kv):
        return None

    @hookimpl
    def allocate_kv(self, scheduled, num_tokens):
        return None

    @hookimpl
    def sample(self, logits, requests):
        return None


def dispatch_overhead_us(repeat: int = 20000) -> dict[str, float]:
    """Microseconds pluggy adds to one call of each per-step hook (median of 5 rounds of
    `repeat` calls, hook call minus direct call)."""
    pm = pluggy.PluginManager("pegboard")
    pm.add_hookspecs(hookspecs)
    plugin = _Instant()
    pm.register(plugin)
    kwargs = {
        "schedule": dict(waiting=[], running=[], budget=None, kv=None),
        "allocate_kv": dict(scheduled=[], num_tokens=[]),
        "sample": dict(logits=None, requests=[]),
    }
    out = {}
    for name in PER_STEP_HOOKS:
        hook, direct, kw = getattr(pm.hook, name), getattr(plugin, name), kwargs[name]
        rounds = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(repeat):
                hook(**kw)
            through = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(repeat):
                direct(**kw)
            rounds.append((through - (time.perf_counter() - start)) / repeat * 1e6)
        out[name] = round(sorted(rounds)[2], 3)
    return out


def plugin_layer_share(mean_step_s: float) -> dict:
    """Dispatch cost per step and its share of a mean step of `mean_step_s` seconds."""
    from pegboard.core.bench.contract_cost import contract_costs

    per_call = dispatch_overhead_us()
    per_step_us = sum(per_call.values())
    checks = contract_costs()  # checking plans and sample outputs (core/contract.py)
    return {
        "hook_dispatch_us": per_call,
        "hook_dispatch_per_step_us": round(per_step_us, 2),
        "contract_check_us": checks,
        "mean_step_ms": round(mean_step_s * 1e3, 3),
        "plugin_layer_share_pct": round(100 * per_step_us * 1e-6 / mean_step_s, 4)
        if mean_step_s > 0
        else None,
        "contract_check_share_pct_batch_256": round(
            100 * checks["batch_256"] * 1e-6 / mean_step_s, 4
        )
        if mean_step_s > 0
        else None,
    }
