"""The prefill engine's side of PD disaggregation (`--disaggregation-mode prefill`).

Every request runs prefill only (`max_tokens` forced to 1). A request that carries a bootstrap
room gets a `KVSender`; when it finished (its first token sampled) its pages are not freed:
they are held until the decode engine that registered the same room has received them through
the transfer plugin, then freed. Requests without a room (warm-up) just run. Each transfer's end
(bytes, seconds, ok or failed) goes to the metrics exporters (`report_transfer`).

Test-only: `PEGBOARD_PD_TEST_HOLD_TRANSFERS` holds transfers in flight (`fault.py`).
"""

from __future__ import annotations

import logging
import queue
import time
from typing import TYPE_CHECKING, Any

from pegboard.core.disaggregation import report_transfer
from pegboard.core.disaggregation.channel import BootstrapServer, Channel, Heartbeats
from pegboard.core.disaggregation.fault import TransferHold
from pegboard.sdk.transfer import (
    TERMINAL,
    KVPoll,
    KVSender,
    PoolLayout,
    byte_runs,
)
from pegboard.sdk.types import FinishReason, Request

if TYPE_CHECKING:
    from pegboard.core.engine import Engine

log = logging.getLogger("pegboard.disaggregation")


class PrefillSide:
    """Senders by room, the bootstrap server, and the step-loop work that moves KV out."""

    def __init__(self, engine: Engine, host: str = "0.0.0.0") -> None:
        c = engine.config
        self.engine = engine
        self.config = c
        self.transfer = engine.plugins.active("transfer")
        pool = engine.kv.pool
        self.layout = PoolLayout.of(pool)
        self.transfer.register_pool(pool)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.senders: dict[int, KVSender] = {}  # room -> sender
        self.channel_of: dict[int, Channel] = {}  # room -> the decode engine's channel
        self.held: dict[int, Request] = {}  # room -> finished request whose pages are held
        self.early: dict[int, tuple[Channel, dict[str, Any], float]] = {}  # registered first
        self.transferred_bytes = 0
        self.hold = TransferHold.from_env()  # test-only fault injection; None in production
        self.server = BootstrapServer(host, c.disaggregation_bootstrap_port, self.events)
        self.heartbeats = Heartbeats(
            lambda: list(self.server.channels), self.events, c.disaggregation_heartbeat_interval
        )

    # ------------------------------------------------------------ engine hooks

    def take(self, r: Request) -> bool:
        """A new request: prefill only; with a room, open its sender. It still runs here."""
        r.params.max_tokens = 1
        boot = r.plugin_state.get("bootstrap")
        if boot is not None:
            sender = KVSender(r, boot.room, self.config.disaggregation_bootstrap_timeout)
            self.senders[boot.room] = sender
            early = self.early.pop(boot.room, None)
            if early is not None:
                self._register(early[0], early[1])
        return False

    def defer_free(self, r: Request) -> bool:
        """Called as a finished request is released: True keeps its pages for the transfer."""
        boot = r.plugin_state.get("bootstrap")
        sender = self.senders.get(boot.room) if boot is not None else None
        if sender is None or sender.poll() in TERMINAL:
            return False
        if r.finish_reason in (FinishReason.STOP, FinishReason.LENGTH) and r.output_token_ids:
            logprobs = r.output_logprobs[0] if r.output_logprobs else None
            sender.input_ready(r.page_table, r.output_token_ids[0], _logprobs_json(logprobs))
            self.held[sender.room] = r
            return True
        sender.fail(f"room {sender.room}: the prefill ended with {r.finish_reason}: {r.error}")
        return False

    def has_work(self) -> bool:
        return not self.events.empty() or any(
            (s.state is KVPoll.TRANSFERRING and not self._held(s)) or s.ready
            for s in self.senders.values()
        )

    def step(self) -> None:
        while not self.events.empty():
            kind, ch, message = self.events.get()
            self._on_event(kind, ch, message)
        for room, sender in list(self.senders.items()):
            self._advance(sender)
            if sender.poll() in TERMINAL:
                self._end(room, sender)
        self._expire_early()

    def close(self) -> None:
        self.heartbeats.stop()
        self.server.close()

    # ------------------------------------------------------------ control messages

    def _on_event(self, kind: str, ch: Channel, message: dict[str, Any]) -> None:
        if kind == "hello":
            self._hello(ch, message)
        elif kind == "register":
            if message["room"] in self.senders:
                self._register(ch, message)
            else:  # the decode engine was faster than the router's request to us
                self.early[message["room"]] = (ch, message, time.monotonic())
        elif kind == "abort":
            sender = self.senders.get(message["room"])
            if sender is not None and sender.state is not KVPoll.TRANSFERRING:
                sender.fail(f"room {sender.room}: aborted by the decode engine")
        elif kind == "closed":
            self._peer_gone(ch, message["reason"])

    def _hello(self, ch: Channel, message: dict[str, Any]) -> None:
        peer, backend = message.get("engine", "?"), message.get("backend")
        why = None
        if backend != self.transfer.name:
            why = f"transfer backend {backend!r} vs this prefill engine's {self.transfer.name!r}"
        else:
            ch.layout = PoolLayout.from_json(message["layout"])
            why = self.layout.mismatch(ch.layout)
        if why is None:
            try:
                self.transfer.connect(peer, message["descriptor"])
            except Exception as e:
                why = f"{type(e).__name__}: {e}"
        if why is not None:
            log.error("refusing decode engine %s: %s", peer, why)
            ch.send({"op": "refused", "error": f"prefill engine refused the pairing: {why}"})
            ch.close(why)
            return
        ch.peer, ch.ready = peer, True
        ch.send({"op": "welcome"})
        log.info("decode engine %s connected from %s", peer, ch.address)

    def _register(self, ch: Channel, message: dict[str, Any]) -> None:
        room = message["room"]
        sender = self.senders[room]
        self.channel_of[room] = ch
        if not ch.ready:
            sender.fail(f"room {room}: the decode engine registered before its hello")
            return
        sender.on_bootstrap(ch.peer, ch.layout, message["pages"], int(message["start_page"]))

    def _peer_gone(self, ch: Channel, reason: str) -> None:
        if ch.peer:
            self.transfer.disconnect(ch.peer)
            log.warning("decode engine %s disconnected: %s", ch.peer, reason)
        for room, sender in self.senders.items():
            if self.channel_of.get(room) is ch and sender.state is not KVPoll.TRANSFERRING:
                sender.fail(f"room {room}: the decode engine {ch.peer} disconnected: {reason}")

    def _expire_early(self) -> None:
        limit = self.config.disaggregation_bootstrap_timeout
        for room, (ch, _, since) in list(self.early.items()):
            if time.monotonic() - since > limit:
                del self.early[room]
                ch.send(
                    {
                        "op": "failed",
                        "room": room,
                        "error": f"room {room}: the prefill engine never received this request "
                        f"within {limit:g} s",
                    }
                )

    # ------------------------------------------------------------ the transfer

    def _held(self, s: KVSender) -> bool:
        return self.hold is not None and self.hold.holds(s.room)

    def _advance(self, s: KVSender) -> None:
        if s.ready:
            self._start(s)
        elif s.state is KVPoll.TRANSFERRING and not self._held(s):
            try:
                if self.transfer.check(s.handle):
                    s.succeed()
                    self._done(s)
            except Exception as e:
                s.fail(f"room {s.room}: transfer to {s.peer} failed: {type(e).__name__}: {e}")

    def _start(self, s: KVSender) -> None:
        n_pages = -(-s.request.num_prompt_tokens // self.layout.page_size)
        src = s.src_pages[s.start_page : n_pages]
        if len(src) != len(s.dst_pages):
            s.fail(
                f"room {s.room}: the decode engine registered {len(s.dst_pages)} pages for "
                f"{len(src)} pages of KV (different prompts for one room?)"
            )
            return
        try:
            runs = byte_runs(self.layout, s.dst_layout, src, s.dst_pages)
            handle = self.engine.hook.transfer_kv(request=s.request, peer=s.peer, runs=runs)
        except Exception as e:
            name = self.engine.plugins.describe(self.transfer)
            s.fail(f"room {s.room}: {name} could not start the transfer: {type(e).__name__}: {e}")
            return
        timeout = self.config.disaggregation_waiting_timeout
        s.transferring(handle, sum(r.nbytes for r in runs), len(runs), timeout)

    def _done(self, s: KVSender) -> None:
        """Count the transfer and log one line (`scripts/bench_pd.py` reads the bandwidth)."""
        now = time.monotonic()
        seconds = max(now - s.transfer_started, 1e-9)
        self.transferred_bytes += s.num_bytes
        report_transfer(self.engine, "prefill", True, s.num_bytes, seconds)
        log.info(
            "room %d: KV %d bytes in %d runs to %s in %.3f ms (%.2f GB/s), %.1f ms after arrival",
            s.room,
            s.num_bytes,
            s.num_runs,
            s.peer,
            seconds * 1e3,
            s.num_bytes / seconds / 1e9,
            (now - s.started) * 1e3,
        )

    def _end(self, room: int, s: KVSender) -> None:
        del self.senders[room]
        ch = self.channel_of.pop(room, None)
        if ch is not None and not ch.closed:
            if s.state is KVPoll.SUCCESS:
                ch.send(
                    {
                        "op": "done",
                        "room": room,
                        "token": s.first_token,
                        "logprobs": s.first_logprobs,
                        "bytes": s.num_bytes,
                    }
                )
            else:
                ch.send({"op": "failed", "room": room, "error": s.error})
        if s.state is KVPoll.FAILED:
            log.error("%s", s.error)
            report_transfer(self.engine, "prefill", False)
        held = self.held.pop(room, None)
        if held is not None:  # finished here: its pages were kept for the transfer
            self.engine.kv.free(held)


def _logprobs_json(lp) -> dict[str, Any] | None:
    if lp is None:
        return None
    return {"token_id": lp.token_id, "logprob": lp.logprob, "top": [list(t) for t in lp.top]}
