"""KV transfer over NVIDIA's NIXL (`nixl-cu12` / `nixl-cu13`, UCX backend).

Each engine runs one NIXL agent; its descriptor is JSON holding the agent's metadata (base64),
the memory type of its KV pool (`DRAM` on CPU, `VRAM` on GPUs) and the device id. Writes are
NIXL `WRITE` transfers, asynchronous by nature: `check` reads `check_xfer_state`.

On a machine without InfiniBand set `UCX_TLS=tcp` (this plugin defaults it) and
`UCX_MODULES=^ib` — without it every process that made a UCX agent crashed at exit here
(two copies of libnl clash); the plugin sets both unless they are set already.
"""

from __future__ import annotations

import base64
import importlib
import json
import os
import uuid
from typing import Any

import pydantic
from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.slots import KVTransfer, Plugin, PluginContext
from pegboard.sdk.transfer import ByteRun, KVTransferError
from pegboard.sdk.types import KVPool, Request

#: UCX transports for device memory on one host (NVLink/PCIe peer copies, then staging).
GPU_TLS = "cuda_ipc,cuda_copy,tcp"
#: Import names of the NIXL wheels: the `nixl` meta package, then the CUDA-specific ones.
NIXL_MODULES = ("nixl._api", "nixl_cu13._api", "nixl_cu12._api")


class NixlOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    backend: str = pydantic.Field("UCX", description="NIXL backend plugin")
    ucx_tls: str | None = pydantic.Field(
        None,
        description="UCX_TLS when it is not set already; default: tcp on CPU, "
        "cuda_ipc,cuda_copy,tcp on GPUs",
    )


def _nixl_api():
    errors = []
    for name in NIXL_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise KVTransferError(
        "the nixl transfer plugin needs NIXL: pip install nixl-cu12 or nixl-cu13 ("
        + "; ".join(errors)
        + ")"
    )


def _mem_type(device: str) -> tuple[str, int]:
    if device.startswith("cuda"):
        return "VRAM", int(device.partition(":")[2] or 0)
    return "DRAM", 0


class NixlTransfer(KVTransfer):
    """Moves KV pages with NIXL WRITE transfers (see the module docstring)."""

    name = "nixl"
    Options = NixlOptions

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        gpu = ctx.device.type == "cuda"
        os.environ.setdefault("UCX_TLS", self.options.ucx_tls or (GPU_TLS if gpu else "tcp"))
        os.environ.setdefault("UCX_MODULES", "^ib")
        api = _nixl_api()
        self.agent_name = f"pegboard-{uuid.uuid4().hex[:12]}"
        config = api.nixl_agent_config(backends=[self.options.backend])
        self.agent = api.nixl_agent(self.agent_name, config)
        self._peers: dict[str, tuple[str, str, int]] = {}  # peer -> (agent, mem type, device)
        self._registered: list[Any] = []
        self._mem = ("DRAM", 0)

    def register_pool(self, pool: KVPool) -> str:
        tensors = [*pool.k, *pool.v]
        self._mem = _mem_type(str(tensors[0].device))
        mem, dev = self._mem
        regions = [(t.data_ptr(), t.numel() * t.element_size(), dev, "") for t in tensors]
        self._registered.append(self.agent.register_memory(regions, mem))
        metadata = base64.b64encode(self.agent.get_agent_metadata()).decode()
        return json.dumps({"metadata": metadata, "mem": mem, "device": dev})

    def connect(self, peer: str, descriptor: str) -> None:
        try:
            d = json.loads(descriptor)
            agent = self.agent.add_remote_agent(base64.b64decode(d["metadata"]))
        except Exception as e:
            raise KVTransferError(
                f"nixl: cannot add {peer}'s agent: {type(e).__name__}: {e}"
            ) from e
        name = agent.decode() if isinstance(agent, bytes) else str(agent)
        self._peers[peer] = (name, d["mem"], int(d["device"]))

    def disconnect(self, peer: str) -> None:
        entry = self._peers.pop(peer, None)
        if entry is not None:
            try:
                self.agent.remove_remote_agent(entry[0])
            except Exception:  # already gone: nothing to release
                pass

    @hookimpl
    def transfer_kv(self, request: Request, peer: str, runs: list[ByteRun]) -> Any:
        entry = self._peers.get(peer)
        if entry is None:
            raise KVTransferError(f"nixl: {peer} is not connected")
        if not runs:
            return None
        agent, dst_mem, dst_dev = entry
        mem, dev = self._mem
        src = self.agent.get_xfer_descs([(r.src, r.nbytes, dev) for r in runs], mem)
        dst = self.agent.get_xfer_descs([(r.dst, r.nbytes, dst_dev) for r in runs], dst_mem)
        handle = self.agent.initialize_xfer("WRITE", src, dst, agent)
        if self.agent.transfer(handle) == "ERR":
            self.agent.release_xfer_handle(handle)
            raise KVTransferError(f"nixl: posting the write to {peer} failed")
        return handle

    def check(self, handle: Any) -> bool:
        if handle is None:
            return True
        state = self.agent.check_xfer_state(handle)
        if state == "PROC":
            return False
        self.agent.release_xfer_handle(handle)
        if state != "DONE":
            raise KVTransferError(f"nixl: write ended in state {state}")
        return True

    def close(self) -> None:
        for peer in list(self._peers):
            self.disconnect(peer)
        for reg in self._registered:
            self.agent.deregister_memory(reg)
        self._registered = []
