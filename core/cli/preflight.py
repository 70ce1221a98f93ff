"""Checks `serve` and `generate` run before anything slow: a typo in a plugin name, a bad
plugin option, an unknown patch (or, with `--strict-patches`, a gated-out one) or a missing
model directory is one line and exit status 2 before the model
loads (and, in `serve`, before the port is bound); a busy port is found before the model loads
too. Each check raises the error the CLI prints without a traceback."""

from __future__ import annotations

import socket
from pathlib import Path

from pegboard.core.config import EngineConfig
from pegboard.core.disaggregation import check_disaggregation
from pegboard.core.models.errors import ModelLoadError
from pegboard.core.moe.flags import check_moe
from pegboard.core.patches import check_patches
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk.slots import SLOTS


class PortInUse(OSError):
    """The address `serve` should listen on cannot be bound."""


def check_before_loading(config: EngineConfig, plugins: PluginManager | None = None) -> None:
    """Every selected plugin exists and accepts its options; `--model` exists."""
    check_patches(config.patches, config.strict_patches)  # unknown, broken, strictly gated
    check_disaggregation(config)  # --disaggregation-mode and --transfer go together
    check_moe(config)  # EP / EPLB need an MoE model whose experts the EP size divides
    manager = plugins or PluginManager()
    for slot in SLOTS:
        chosen = config.selection(slot)
        for name in [chosen] if isinstance(chosen, str) else chosen or []:
            manager.validate_options(slot, name, config.plugin_options.get(name))
    if config.model is not None and not Path(config.model).exists():
        raise ModelLoadError(f"the model directory {config.model} does not exist")


def bind_listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port`, handed to uvicorn, so a busy port fails before loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise PortInUse(f"cannot listen on {host}:{port}: {e.strerror or e}") from e
    sock.set_inheritable(True)
    return sock
