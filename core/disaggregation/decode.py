"""The decode engine's side of PD disaggregation (`--disaggregation-mode decode`).

A request that carries a bootstrap (the prefill engine's host and bootstrap port, and the
room) does not enter the waiting queue: it gets a `KVReceiver`, pages for its prompt are
allocated through the KV cache plugin, registered with the prefill engine, and once the KV and
the prefill's first token arrived the request joins the running requests with its prompt
computed — the next step decodes from the first token. A request without a bootstrap runs here
as on any engine (warm-up, colocated use).

Pages are freed on every path: success hands them to the running request; a failure (timeout,
unreachable or dead prefill engine, transfer error) fails the request, which releases them. A
request aborted while the prefill engine may still write into its pages keeps them until that
engine answered or is gone (vllm#41269: never hand out pages a peer still writes to).
"""

from __future__ import annotations

import logging
import os
import queue
import time
import uuid
from typing import TYPE_CHECKING, Any

import torch
from pegboard.core.disaggregation import report_transfer
from pegboard.core.disaggregation.channel import Channel, Heartbeats, open_channel
from pegboard.sdk.transfer import TERMINAL, KVPoll, KVReceiver, PoolLayout
from pegboard.sdk.types import Request, RequestStatus, TokenLogprobs

if TYPE_CHECKING:
    from pegboard.core.engine import Engine

log = logging.getLogger("pegboard.disaggregation")


class DecodeSide:
    """Receivers by request id, channels by prefill address, and the step-loop work that
    pairs requests, receives their KV and hands them to the engine."""

    def __init__(self, engine: Engine) -> None:
        c = engine.config
        self.engine = engine
        self.config = c
        self.transfer = engine.plugins.active("transfer")
        pool = engine.kv.pool
        self.layout = PoolLayout.of(pool)
        self.descriptor = self.transfer.register_pool(pool)
        self.id = f"decode-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.receivers: dict[str, KVReceiver] = {}  # request id -> receiver
        self.channels: dict[str, Channel] = {}  # prefill HOST:PORT -> channel (ready or not)
        self.connecting: set[str] = set()
        self.heartbeats = Heartbeats(
            lambda: list(self.channels.values()), self.events, c.disaggregation_heartbeat_interval
        )

    # ------------------------------------------------------------ engine hooks

    def take(self, r: Request) -> bool:
        """A new request: with a bootstrap, wait for its KV here instead of queueing it."""
        boot = r.plugin_state.get("bootstrap")
        if boot is None:
            return False
        c = self.config
        self.receivers[r.request_id] = KVReceiver(
            r,
            boot.room,
            c.disaggregation_bootstrap_timeout,
            bootstrap=boot,
            waiting_timeout=c.disaggregation_waiting_timeout,
        )
        if boot.address not in self.channels and boot.address not in self.connecting:
            self.connecting.add(boot.address)
            open_channel(boot.host, boot.port, self.events, c.disaggregation_bootstrap_timeout)
        return True

    def defer_free(self, r: Request) -> bool:
        """Called as a request is released: True keeps its pages while the prefill engine may
        still write into them (it was registered and has not answered)."""
        rec = self.receivers.get(r.request_id)
        if rec is None:
            return False
        if rec.registered and rec.poll() not in TERMINAL:
            ch = self.channels.get(rec.peer)
            if ch is not None and not ch.closed:
                ch.send({"op": "abort", "room": rec.room})
                return True  # freed when the prefill engine answers, dies, or times out
        del self.receivers[r.request_id]
        return False

    def has_work(self) -> bool:
        return not self.events.empty()

    def step(self) -> None:
        while not self.events.empty():
            kind, ch, message = self.events.get()
            self._on_event(kind, ch, message)
        for rec in list(self.receivers.values()):
            self._advance(rec)

    def close(self) -> None:
        self.heartbeats.stop()
        for ch in list(self.channels.values()):
            ch.close("the decode engine is shutting down")

    def num_receiving(self) -> int:
        return sum(1 for rec in self.receivers.values() if rec.request.page_table)

    # ------------------------------------------------------------ control messages

    def _on_event(self, kind: str, ch: Any, message: dict[str, Any]) -> None:
        if kind == "connected":
            self.connecting.discard(ch.address)
            self.channels[ch.address] = ch
            ch.send(
                {
                    "op": "hello",
                    "engine": self.id,
                    "backend": self.transfer.name,
                    "descriptor": self.descriptor,
                    "layout": self.layout.to_json(),
                }
            )
        elif kind == "unreachable":
            self.connecting.discard(ch)
            self._fail_peer(
                ch,
                f"cannot reach the prefill engine's bootstrap server at {ch}: {message['error']}",
            )
        elif kind == "welcome":
            ch.ready = True
        elif kind == "refused":
            self._fail_peer(ch.address, message["error"])
        elif kind in ("done", "failed"):
            rec = self._by_room(ch.address, message["room"])
            if rec is None:
                return
            if kind == "done":
                rec.succeed(
                    message["token"], _logprobs(message.get("logprobs")), message.get("bytes", 0)
                )
            else:
                rec.fail(message["error"])
        elif kind == "closed":
            if self.channels.get(ch.address) is ch:
                del self.channels[ch.address]
            self._fail_peer(
                ch.address, f"lost the prefill engine at {ch.address}: {message['reason']}"
            )

    def _by_room(self, address: str, room: int) -> KVReceiver | None:
        for rec in self.receivers.values():
            if rec.room == room and rec.peer == address:
                return rec
        return None

    def _fail_peer(self, address: str, error: str) -> None:
        for rec in self.receivers.values():
            if rec.peer == address:
                rec.fail(f"room {rec.room}: {error}")

    # ------------------------------------------------------------ pairing and hand-over

    def _advance(self, rec: KVReceiver) -> None:
        r = rec.request
        state = rec.poll()
        if r.finished:  # aborted meanwhile; its pages wait for the prefill engine's answer
            if state in TERMINAL:
                del self.receivers[r.request_id]
                self.engine.kv.free(r)
                arrived = state is KVPoll.SUCCESS  # the KV came, for a request already gone
                report_transfer(
                    self.engine,
                    "decode",
                    arrived,
                    rec.num_bytes,
                    time.monotonic() - rec.registered_at,
                )
            return
        if state is KVPoll.BOOTSTRAPPING:
            ch = self.channels.get(rec.peer)
            if ch is not None and ch.ready:
                self._register(rec, ch)
        elif state is KVPoll.SUCCESS:
            del self.receivers[r.request_id]
            seconds = time.monotonic() - rec.registered_at
            report_transfer(self.engine, "decode", True, rec.num_bytes, seconds)
            self._hand_over(rec)
        elif state is KVPoll.FAILED:
            log.error("%s", rec.error)
            report_transfer(self.engine, "decode", False)
            self.engine._fail([r], rec.error or "KV transfer failed")
            self.receivers.pop(r.request_id, None)

    def _register(self, rec: KVReceiver, ch: Channel) -> None:
        """Allocate the prompt's pages (a prefix the cache holds is reused) and tell the
        prefill engine where to write; retried at the next event when pages are short."""
        e, r = self.engine, rec.request
        if len(e.running) + self.num_receiving() >= e.config.max_running_requests:
            return
        n = r.num_prompt_tokens - e.kv.match_prefix(r)
        failed = e.guard.call("kv_cache", e.hook.allocate_kv, scheduled=[r], num_tokens=[n])
        if failed:
            return
        start_page = r.num_computed_tokens // self.layout.page_size
        self._settle_device()
        ch.send(
            {
                "op": "register",
                "room": rec.room,
                "pages": r.page_table[start_page:],
                "start_page": start_page,
            }
        )
        rec.init()

    def _settle_device(self) -> None:
        """On a GPU, wait for the forward in flight before a peer may write into pages: with
        overlap scheduling it can still write a just-finished request's last token into a page
        that was freed and is now handed out (stream order protects the engine's own writes,
        not a transfer library's)."""
        device = self.engine.kv.pool.k[0].device
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()

    def _hand_over(self, rec: KVReceiver) -> None:
        e, r = self.engine, rec.request
        r.num_computed_tokens = r.num_prompt_tokens
        r.status = RequestStatus.RUNNING
        r.first_scheduled_time = r.first_scheduled_time or time.monotonic()
        e.running.append(r)
        if e._append(r, (rec.first_token,), (rec.first_logprobs,)):  # it ended (EOS, max_tokens 1)
            e._release(r)


def _logprobs(data: dict[str, Any] | None) -> TokenLogprobs | None:
    if data is None:
        return None
    return TokenLogprobs(data["token_id"], data["logprob"], [tuple(t) for t in data["top"]])
