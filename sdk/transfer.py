"""The `transfer` slot's vocabulary: KV layouts, byte runs, and the per-request state machines
of prefill/decode disaggregation (SGLang's poll states).

A transfer is split where the process split is (vLLM's connector roles): the *control* side —
bootstrap, heartbeats, timeouts, page bookkeeping — is the core's (`pegboard.core.
disaggregation`) and is the same for every backend; the *data* side — registering the KV pool
with a transfer library and moving bytes — is the plugin's (`pegboard.sdk.KVTransfer`). A
backend author writes only the data side; `KVSender` and `KVReceiver` are what the core keeps
per request and what the conformance kit drives.

States (`KVPoll`), in the order a request goes through them:

- `BOOTSTRAPPING` — the two engines have not yet paired this request: the decode side has no
  pages for it or has not told the prefill side where they are.
- `WAITING_FOR_INPUT` — paired; the prefill side has not finished computing the KV (sender), or
  the decode side waits for it to arrive (receiver).
- `TRANSFERRING` — the plugin is moving the bytes (sender only; the receiver stays waiting).
- `SUCCESS` — the KV is in the decode engine's pages; the prefill side may free its pages.
- `FAILED` — `failure_exception()` says why (timeout, dead peer, library error), naming the peer.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict

from pegboard.sdk.types import KVPool, Request


class KVPoll(enum.IntEnum):
    """Where a request's transfer stands (SGLang's `KVPoll`, same order)."""

    FAILED = 0
    BOOTSTRAPPING = 1
    WAITING_FOR_INPUT = 2
    TRANSFERRING = 3
    SUCCESS = 4


TERMINAL = (KVPoll.SUCCESS, KVPoll.FAILED)


class KVTransferError(RuntimeError):
    """A request's KV could not be moved; the message names the peer and the cause."""


class KVTransferRecord(TypedDict):
    """One request's KV transfer as the engine reports it to the metrics exporters
    (`MetricsSnapshot(kind="transfer", transfer=...)`), once per side when it ends.

    - `backend`: the transfer plugin's name (`mooncake`, `nixl`).
    - `role`: `prefill` (the sender) or `decode` (the receiver).
    - `ok`: the KV reached the decode engine; False for a timeout, a dead peer, a library
      error or an abort.
    - `bytes`: bytes moved (0 when it failed).
    - `seconds`: prefill: from posting the copies to their completion; decode: from
      registering the pages to the KV's arrival (includes waiting for the prefill itself).
      0 when it failed.
    """

    backend: str
    role: Literal["prefill", "decode"]
    ok: bool
    bytes: int
    seconds: float


@dataclass(frozen=True)
class PoolLayout:
    """Where a KV pool's pages are, as a peer needs it to address them: per layer the base
    address of the key and the value tensor (`[num_pages, page_size, kv_heads, head_dim]`,
    contiguous; values may be stored transposed per page, `v_layout`, a page still one block
    of bytes), and the bytes of one page of one of them. Both sides must agree on
    `page_size`, `page_bytes` and `v_layout` (same model, dtype, page size, TP size and
    `--kv-cache-layout`)."""

    k: tuple[int, ...]
    v: tuple[int, ...]
    page_bytes: int
    page_size: int
    num_pages: int
    device: str  # "cpu", "cuda:0", ...
    v_layout: str = "nhd"  # `KVPool.v_layout`

    @classmethod
    def of(cls, pool: KVPool) -> PoolLayout:
        for t in (*pool.k, *pool.stored_values()):
            if not t.is_contiguous():
                raise ValueError("KV pool tensors must be contiguous to be transferred")
        first = pool.k[0]
        return cls(
            k=tuple(t.data_ptr() for t in pool.k),
            v=tuple(t.data_ptr() for t in pool.v),
            page_bytes=first[0].numel() * first.element_size() if first.shape[0] else 0,
            page_size=pool.page_size,
            num_pages=pool.num_pages,
            device=str(first.device),
            v_layout=pool.v_layout,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "k": list(self.k),
            "v": list(self.v),
            "page_bytes": self.page_bytes,
            "page_size": self.page_size,
            "num_pages": self.num_pages,
            "device": self.device,
            "v_layout": self.v_layout,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> PoolLayout:
        return cls(
            k=tuple(data["k"]),
            v=tuple(data["v"]),
            page_bytes=int(data["page_bytes"]),
            page_size=int(data["page_size"]),
            num_pages=int(data["num_pages"]),
            device=str(data["device"]),
            v_layout=str(data.get("v_layout", "nhd")),
        )

    def mismatch(self, other: PoolLayout) -> str | None:
        """Why pages of `other` cannot be copied into this layout's pages, or None."""
        if len(self.k) != len(other.k):
            return f"{len(other.k)} layers vs {len(self.k)}"
        if self.page_size != other.page_size:
            return f"page size {other.page_size} vs {self.page_size}"
        if self.page_bytes != other.page_bytes:
            return (
                f"{other.page_bytes} bytes per page vs {self.page_bytes} (different model, "
                "dtype or TP size)"
            )
        if self.v_layout != other.v_layout:
            return (
                f"values stored {other.v_layout!r} vs {self.v_layout!r} (give both engines the "
                "same --kv-cache-layout)"
            )
        return None


@dataclass(frozen=True)
class ByteRun:
    """One contiguous copy: `nbytes` from local address `src` to the peer's address `dst`."""

    src: int
    dst: int
    nbytes: int


def page_runs(src_pages: list[int], dst_pages: list[int]) -> list[tuple[int, int, int]]:
    """`(src_start, dst_start, count)` runs: consecutive pages that are consecutive on both
    sides become one run."""
    if len(src_pages) != len(dst_pages):
        raise ValueError(f"{len(src_pages)} source pages vs {len(dst_pages)} destination pages")
    runs: list[tuple[int, int, int]] = []
    for s, d in zip(src_pages, dst_pages):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1] = (runs[-1][0], runs[-1][1], runs[-1][2] + 1)
        else:
            runs.append((s, d, 1))
    return runs


def byte_runs(
    src: PoolLayout, dst: PoolLayout, src_pages: list[int], dst_pages: list[int]
) -> list[ByteRun]:
    """The copies that move `src_pages` of `src` into `dst_pages` of `dst`: per layer, key
    then value, one `ByteRun` per run of contiguous pages."""
    why = dst.mismatch(src)
    if why:
        raise KVTransferError(f"incompatible KV layouts: {why}")
    for pages, layout, side in ((src_pages, src, "source"), (dst_pages, dst, "destination")):
        bad = [p for p in pages if not 0 <= p < layout.num_pages]
        if bad:
            raise KVTransferError(f"{side} pages outside the pool: {bad[:5]}")
    n = src.page_bytes
    runs = page_runs(src_pages, dst_pages)
    out = []
    for layer in range(len(src.k)):
        for s_base, d_base in ((src.k[layer], dst.k[layer]), (src.v[layer], dst.v[layer])):
            out.extend(ByteRun(s_base + s * n, d_base + d * n, c * n) for s, d, c in runs)
    return out


@dataclass(frozen=True)
class Bootstrap:
    """How a decode engine finds the prefill engine of a request: the prefill engine's host and
    bootstrap port, and the room — a number the router draws per request and sends to both
    engines, which pairs the two halves (SGLang's bootstrap room)."""

    host: str
    port: int
    room: int

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(eq=False)
class _Session:
    """What a sender and a receiver share: the request, its room, its state and deadline."""

    request: Request
    room: int
    timeout: float
    state: KVPoll = KVPoll.BOOTSTRAPPING
    error: str | None = None
    peer: str = ""
    deadline: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.deadline = self.started + self.timeout

    def poll(self) -> KVPoll:
        """The current state; a deadline passed turns a non-terminal state into FAILED."""
        if self.state not in TERMINAL and time.monotonic() > self.deadline:
            self.fail(self._timeout_message())
        return self.state

    def failure_exception(self) -> KVTransferError:
        """The error of a FAILED session (a message naming the peer and the cause)."""
        return KVTransferError(self.error or f"room {self.room}: no failure recorded")

    def fail(self, error: str) -> None:
        if self.state not in TERMINAL:
            self.state, self.error = KVPoll.FAILED, error

    def _advance(self, state: KVPoll, timeout: float | None = None) -> None:
        if self.state in TERMINAL:
            return
        self.state = state
        if timeout is not None:
            self.deadline = time.monotonic() + timeout

    def _timeout_message(self) -> str:
        return f"room {self.room}: timed out in state {self.state.name}"


@dataclass(eq=False)
class KVSender(_Session):
    """The prefill side of one request's transfer.

    BOOTSTRAPPING until the decode side registers its pages for the room (`timeout` seconds,
    the bootstrap timeout); WAITING_FOR_INPUT until the prefill finished (`input_ready`);
    TRANSFERRING while the plugin moves the bytes; then SUCCESS or FAILED. Either order of
    registration and prefill completion works: the transfer starts when both happened.
    """

    dst_pages: list[int] | None = None
    dst_layout: PoolLayout | None = None
    start_page: int = 0
    src_pages: list[int] | None = None
    first_token: int | None = None
    first_logprobs: Any = None
    handle: Any = None
    num_bytes: int = 0
    num_runs: int = 0
    transfer_started: float = 0.0

    def on_bootstrap(
        self, peer: str, layout: PoolLayout, dst_pages: list[int], start_page: int
    ) -> None:
        """The decode side registered: its pages for this request's tokens from page
        `start_page` on (earlier pages it has cached itself)."""
        self.peer, self.dst_layout, self.dst_pages = peer, layout, list(dst_pages)
        self.start_page = start_page
        self._advance(KVPoll.WAITING_FOR_INPUT)

    def input_ready(self, src_pages: list[int], first_token: int, logprobs: Any = None) -> None:
        """The prefill finished: its KV is in `src_pages` and it sampled `first_token`."""
        self.src_pages, self.first_token, self.first_logprobs = (
            list(src_pages),
            first_token,
            logprobs,
        )

    @property
    def ready(self) -> bool:
        """Paired and computed: the transfer can start."""
        return self.state is KVPoll.WAITING_FOR_INPUT and self.src_pages is not None

    def transferring(self, handle: Any, num_bytes: int, num_runs: int, timeout: float) -> None:
        """The plugin started the copies (`handle`); they must end within `timeout` s."""
        self.handle, self.num_bytes, self.num_runs = handle, num_bytes, num_runs
        self.transfer_started = time.monotonic()
        self._advance(KVPoll.TRANSFERRING, timeout)

    def succeed(self) -> None:
        self._advance(KVPoll.SUCCESS)

    def _timeout_message(self) -> str:
        if self.state is KVPoll.BOOTSTRAPPING:
            return (
                f"room {self.room}: no decode engine registered for this request within "
                f"{self.timeout:g} s (bootstrap timeout)"
            )
        return f"room {self.room}: transfer to {self.peer} timed out in state {self.state.name}"


@dataclass(eq=False)
class KVReceiver(_Session):
    """The decode side of one request's transfer.

    BOOTSTRAPPING until it holds pages for the request and the prefill engine at
    `bootstrap.address` acknowledged them (`timeout` seconds, the bootstrap timeout); then
    WAITING_FOR_INPUT until the KV and the prefill's first token arrive (`waiting_timeout`);
    then SUCCESS or FAILED.
    """

    bootstrap: Bootstrap | None = None
    waiting_timeout: float = 300.0
    registered: bool = False
    registered_at: float = 0.0
    num_bytes: int = 0
    first_token: int | None = None
    first_logprobs: Any = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.bootstrap is not None:
            self.peer = self.bootstrap.address

    def init(self) -> None:
        """The pages were registered with the prefill side: wait for the KV."""
        self.registered = True
        self.registered_at = time.monotonic()
        self._advance(KVPoll.WAITING_FOR_INPUT, self.waiting_timeout)

    def succeed(self, first_token: int, logprobs: Any = None, num_bytes: int = 0) -> None:
        """The KV (`num_bytes`, as the prefill side counted them) and the first token arrived."""
        self.first_token, self.first_logprobs, self.num_bytes = first_token, logprobs, num_bytes
        self._advance(KVPoll.SUCCESS)

    def _timeout_message(self) -> str:
        if self.state is KVPoll.BOOTSTRAPPING:
            return (
                f"room {self.room}: could not pair with the prefill engine at {self.peer} "
                f"within {self.timeout:g} s (bootstrap timeout)"
            )
        return (
            f"room {self.room}: the KV from the prefill engine at {self.peer} did not arrive "
            f"within {self.waiting_timeout:g} s (waiting timeout)"
        )
