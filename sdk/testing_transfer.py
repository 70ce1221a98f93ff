"""Conformance checks of the `transfer` slot (re-exported by `pegboard.sdk.testing`).

    from pegboard.sdk.testing_transfer import check_transfer

    def test_my_backend_conforms():
        check_transfer(MyTransfer)

`check_transfer` builds two instances of the plugin as two engines would (a prefill side and a
decode side, each with its own KV pool, in one process), pairs them through `register_pool`
and `connect`, moves pages with `transfer_kv` + `check` exactly as the core does, and compares
the bytes. It quotes the `pegboard.sdk.KVTransfer` sentence a plugin broke.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from typing import Any

import torch
from pegboard.sdk.slots import KVTransfer
from pegboard.sdk.transfer import KVTransferError, PoolLayout, byte_runs
from pegboard.sdk.types import KVPool, Request

__all__ = ["check_transfer"]

#: Source -> destination pages of the check: runs of different lengths, out of order, a page
#: of the pool's edges, so that a plugin that mixes up offsets or run lengths moves wrong bytes.
SRC_PAGES = [1, 2, 3, 6, 0, 7]
DST_PAGES = [4, 5, 6, 0, 7, 2]


def check_transfer(
    cls: type[KVTransfer],
    options: dict[str, Any] | None = None,
    device: str = "cpu",
    timeout: float = 60.0,
) -> None:
    """Raise `ConformanceError` unless `cls` moves KV pages between two pools byte for byte.

    `timeout` only bounds a hung plugin (the check polls `check` until it returns True)."""
    from pegboard.sdk.testing import _require, _selected, plugin_context

    ctx = plugin_context()
    info = ctx.model
    dtype = torch.float32
    with ExitStack() as stack:
        _, sender = stack.enter_context(_selected(cls, "transfer", options, ctx))
        _, receiver = stack.enter_context(_selected(cls, "transfer", options, ctx))
        src = KVPool.allocate(info, 8, 4, torch.device(device))
        dst = KVPool.allocate(info, 8, 4, torch.device(device))
        gen = torch.Generator().manual_seed(0)
        for t in (*src.k, *src.v):
            t.copy_(torch.randn(t.shape, generator=gen, dtype=dtype))
        descriptor = receiver.register_pool(dst)
        sender.register_pool(src)
        _require(
            isinstance(descriptor, str) and descriptor != "",
            "register_pool(pool) ... return this engine's descriptor, a string",
            f"returned {descriptor!r}",
        )
        sender.connect("decode-0", descriptor)
        runs = byte_runs(PoolLayout.of(src), PoolLayout.of(dst), SRC_PAGES, DST_PAGES)
        request = Request([1, 2, 3], request_id="conformance")
        request.page_table = list(SRC_PAGES)
        handle = sender.transfer_kv(request, "decode-0", runs)
        _wait(sender, handle, timeout)
        _compare(src, dst, SRC_PAGES, DST_PAGES)
        _check_unknown_peer(sender, request, runs)
        _check_bad_descriptor(sender)


def _wait(plugin: KVTransfer, handle: Any, timeout: float) -> None:
    from pegboard.sdk.testing import ConformanceError, _require

    deadline = time.monotonic() + timeout
    while True:
        done = plugin.check(handle)
        _require(
            done in (True, False),
            "check(handle) — True once every byte of the handle is in the peer's memory, "
            "False while in flight",
            f"returned {done!r}",
        )
        if done:
            return
        if time.monotonic() > deadline:
            raise ConformanceError(f"check(handle) still False after {timeout:g} s")
        time.sleep(0.001)


def _compare(src: KVPool, dst: KVPool, src_pages: list[int], dst_pages: list[int]) -> None:
    from pegboard.sdk.testing import _require

    untouched = [p for p in range(dst.num_pages) if p not in dst_pages]
    for layer in range(len(src.k)):
        for kind, s, d in (
            ("key", src.k[layer], dst.k[layer]),
            ("value", src.v[layer], dst.v[layer]),
        ):
            for sp, dp in zip(src_pages, dst_pages):
                _require(
                    torch.equal(s[sp], d[dp]),
                    "transfer_kv(request, peer, runs) — start copying every ByteRun (local "
                    "src address to the peer's dst address)",
                    f"layer {layer} {kind}: source page {sp} differs from destination page {dp}",
                )
            for p in untouched:
                _require(
                    not d[p].any(),
                    "transfer_kv copies exactly the runs it is given",
                    f"layer {layer} {kind}: destination page {p} was written",
                )


def _check_unknown_peer(plugin: KVTransfer, request: Request, runs) -> None:
    from pegboard.sdk.testing import ConformanceError, _require

    try:
        handle = plugin.transfer_kv(request, "nobody", runs)
        while not plugin.check(handle):
            time.sleep(0.001)
    except KVTransferError as e:
        _require(
            "nobody" in str(e),
            "raise KVTransferError naming the peer",
            f"message {str(e)!r} does not name peer 'nobody'",
        )
        return
    raise ConformanceError("transfer_kv to a peer never connected must raise KVTransferError")


def _check_bad_descriptor(plugin: KVTransfer) -> None:
    from pegboard.sdk.testing import ConformanceError, _require

    try:
        plugin.connect("garbage-peer", "not a descriptor")
    except KVTransferError as e:
        _require(
            "garbage-peer" in str(e),
            "connect: raise KVTransferError naming the peer if it cannot be reached",
            f"message {str(e)!r} does not name the peer",
        )
        return
    raise ConformanceError("connect(peer, descriptor) with a malformed descriptor must raise")
