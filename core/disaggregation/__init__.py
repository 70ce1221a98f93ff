"""Prefill/decode disaggregation (docs/architecture.md, "PD disaggregation").

`pegboard serve --disaggregation-mode prefill|decode --transfer mooncake|nixl` makes an engine
one half of a pair; `pegboard router --pd --prefill URL --decode URL` sends each request to
both halves with the same bootstrap room. The engine calls into this package at five points
(`take` a new request, `step`, `defer_free` on release, `has_work`, `close`); the control
plane lives here, the bytes move through the `transfer` plugin (`pegboard.sdk.KVTransfer`).
"""

from __future__ import annotations

import argparse
import time
from typing import TYPE_CHECKING, Any

from pegboard.sdk.transfer import Bootstrap, KVTransferRecord
from pegboard.sdk.types import MetricsSnapshot

if TYPE_CHECKING:
    from pegboard.core.config import EngineConfig
    from pegboard.core.disaggregation.decode import DecodeSide
    from pegboard.core.disaggregation.prefill import PrefillSide
    from pegboard.core.engine import Engine

MODES = ("null", "prefill", "decode")
#: SGLang's default bootstrap port.
DEFAULT_BOOTSTRAP_PORT = 8998


def add_disaggregation_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("prefill/decode disaggregation (docs/architecture.md)")
    g.add_argument(
        "--disaggregation-mode",
        choices=MODES,
        default="null",
        help="prefill: run prefills and send their KV to decode engines; decode: receive KV "
        "and decode; null: a colocated engine (default). Needs --transfer mooncake|nixl",
    )
    g.add_argument(
        "--disaggregation-bootstrap-port",
        type=int,
        default=DEFAULT_BOOTSTRAP_PORT,
        metavar="N",
        help=f"prefill engine: the TCP port decode engines pair on (default {DEFAULT_BOOTSTRAP_PORT})",
    )
    g.add_argument(
        "--disaggregation-bootstrap-timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a request may wait to be paired with its other half (default 30)",
    )
    g.add_argument(
        "--disaggregation-waiting-timeout",
        type=float,
        default=300.0,
        metavar="S",
        help="seconds a decode engine waits for a paired request's KV (default 300)",
    )
    g.add_argument(
        "--disaggregation-heartbeat-interval",
        type=float,
        default=2.0,
        metavar="S",
        help="seconds between heartbeats; a peer silent for 3 of them is dead (default 2)",
    )


def check_disaggregation(config: EngineConfig) -> None:
    """Raise ValueError for settings PD disaggregation cannot run with."""
    mode = config.disaggregation_mode
    if mode == "null":
        if config.transfer:
            raise ValueError(
                f"--transfer {config.transfer} needs --disaggregation-mode prefill or decode"
            )
        return
    if not config.transfer:
        raise ValueError(
            f"--disaggregation-mode {mode} needs a transfer backend: --transfer mooncake or nixl"
        )
    if config.tp_size != 1:
        raise ValueError(
            "--disaggregation-mode needs --tp-size 1 (KV transfer between TP groups is not "
            "implemented; docs/architecture.md)"
        )


def start_disaggregation(engine: Engine) -> PrefillSide | DecodeSide | None:
    """The engine's PD side for its `--disaggregation-mode`, or None for a colocated engine."""
    check_disaggregation(engine.config)
    mode = engine.config.disaggregation_mode
    if mode == "prefill":
        from pegboard.core.disaggregation.prefill import PrefillSide

        return PrefillSide(engine)
    if mode == "decode":
        from pegboard.core.disaggregation.decode import DecodeSide

        return DecodeSide(engine)
    return None


def attach_bootstrap(requests: list[Any], body: Any) -> None:
    """Copy the router's bootstrap fields of an HTTP body onto its engine requests; choice `k`
    uses room `bootstrap_room + k` (the router does the same on both engines)."""
    room = getattr(body, "bootstrap_room", None)
    if room is None:
        return
    host = getattr(body, "bootstrap_host", None) or "127.0.0.1"
    port = getattr(body, "bootstrap_port", None) or DEFAULT_BOOTSTRAP_PORT
    for k, r in enumerate(requests):
        r.plugin_state["bootstrap"] = Bootstrap(host, int(port), int(room) + k)


def report_transfer(
    engine: Engine, role: str, ok: bool, num_bytes: int = 0, seconds: float = 0.0
) -> None:
    """Tell the metrics exporters that one request's KV transfer ended on this side."""
    record = KVTransferRecord(
        backend=engine.plugins.active("transfer").name,
        role=role,
        ok=ok,
        bytes=num_bytes if ok else 0,
        seconds=seconds if ok else 0.0,
    )
    engine._export(MetricsSnapshot(kind="transfer", timestamp=time.time(), transfer=record))
