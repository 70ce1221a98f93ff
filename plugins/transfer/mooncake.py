"""KV transfer over Mooncake's TransferEngine (`mooncake-transfer-engine`): P2P handshake
metadata (no etcd), TCP on a CPU machine, RDMA or NVLink where chosen (`--mooncake-protocol`;
on one host with GPUs, `nvlink_intra` copies device memory peer to peer: TCP stages every page
through host memory and moved ~0.07 GB/s per request on two H200s, 2026-11-30).

Each engine runs one TransferEngine; its descriptor is `host:rpc_port`. The KV pool's key and
value tensors are registered whole, so any page run is a valid region. Writes go through
`batch_transfer_sync_write` on one worker thread, so the step loop never waits on the network.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Literal

import pydantic
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.slots import KVTransfer, Plugin, PluginContext
from pegboard.sdk.transfer import ByteRun, KVTransferError
from pegboard.sdk.types import KVPool, Request

log = logging.getLogger("pegboard.transfer.mooncake")


class MooncakeOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    host: str = pydantic.Field(
        "127.0.0.1", description="address peers reach this engine's TransferEngine at"
    )
    protocol: Literal["tcp", "rdma", "nvlink_intra", "nvlink"] = pydantic.Field(
        "tcp",
        description="Mooncake transport, the same on both sides: tcp (any machine), rdma "
        "(InfiniBand/RoCE), nvlink_intra (GPUs of one host: CUDA IPC copies over NVLink; both "
        "processes must see both GPUs), nvlink (multi-node NVLink fabric)",
    )
    device_name: str = pydantic.Field(
        "", description="RDMA device(s) for protocol rdma, e.g. mlx5_0; empty: auto"
    )


#: Mooncake's TransferEngine chooses its transport when it starts: with no RDMA device it
#: installs TCP whatever protocol `initialize` names (seen on two H200s, 2026-11-30: "Using TCP
#: transport (no HCA detected)" for nvlink_intra) unless these variables ask for NVLink.
_TRANSPORT_ENV = {"nvlink_intra": "MC_INTRANODE_NVLINK", "nvlink": "MC_FORCE_MNNVL"}


def _engine_class():
    try:
        from mooncake.engine import TransferEngine
    except ImportError as e:
        raise KVTransferError(
            "the mooncake transfer plugin needs Mooncake: pip install "
            "mooncake-transfer-engine-non-cuda (CPU) or mooncake-transfer-engine (CUDA); "
            f"it also needs Debian's libibverbs1 ({e})"
        ) from e
    return TransferEngine


class MooncakeTransfer(KVTransfer):
    """Moves KV pages with Mooncake's TransferEngine (see the module docstring)."""

    name = "mooncake"
    Options = MooncakeOptions

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        o = self.options
        if o.protocol in _TRANSPORT_ENV:  # its auto-discovery picks by environment, not argument
            os.environ.setdefault(_TRANSPORT_ENV[o.protocol], "1")
        self.engine = _engine_class()()
        if self.engine.initialize(o.host, "P2PHANDSHAKE", o.protocol, o.device_name) != 0:
            raise KVTransferError(
                f"mooncake: TransferEngine.initialize({o.host!r}, P2PHANDSHAKE, {o.protocol!r}) "
                "failed"
            )
        self.address = f"{o.host}:{self.engine.get_rpc_port()}"
        self._peers: dict[str, str] = {}
        self._regions: list[int] = []
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="pegboard-mooncake")

    def register_pool(self, pool: KVPool) -> str:
        tensors = [*pool.k, *pool.v]
        addrs = [t.data_ptr() for t in tensors]
        sizes = [t.numel() * t.element_size() for t in tensors]
        if self.engine.batch_register_memory(addrs, sizes) != 0:
            raise KVTransferError("mooncake: registering the KV pool's memory failed")
        self._regions.extend(addrs)
        return self.address

    def connect(self, peer: str, descriptor: str) -> None:
        host, _, port = descriptor.rpartition(":")
        if not host or not port.isdigit():
            raise KVTransferError(f"mooncake: peer {peer} sent a bad address {descriptor!r}")
        self._peers[peer] = descriptor  # P2PHANDSHAKE connects on the first write

    def disconnect(self, peer: str) -> None:
        self._peers.pop(peer, None)

    @hookimpl
    def transfer_kv(self, request: Request, peer: str, runs: list[ByteRun]) -> Future:
        target = self._peers.get(peer)
        if target is None:
            raise KVTransferError(f"mooncake: {peer} is not connected")
        return self._writer.submit(self._write, target, runs)

    def _write(self, target: str, runs: list[ByteRun]) -> int:
        if not runs:
            return 0
        return self.engine.batch_transfer_sync_write(
            target, [r.src for r in runs], [r.dst for r in runs], [r.nbytes for r in runs]
        )

    def check(self, handle: Any) -> bool:
        if not handle.done():
            return False
        try:
            rc = handle.result()
        except Exception as e:
            raise KVTransferError(f"mooncake: write failed: {type(e).__name__}: {e}") from e
        if rc != 0:
            raise KVTransferError(f"mooncake: batch_transfer_sync_write returned {rc}")
        return True

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        if self._regions:
            self.engine.batch_unregister_memory(self._regions)
            self._regions = []
