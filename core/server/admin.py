"""The admin API (mounted only when an admin token is configured, and guarded by it):

- `GET /admin/plugins` — the active plugin of each slot, every discovered plugin with its
  state and error count (exceptions and contract violations, `pegboard.core.contract`), and the
  applied patches.
- `POST /admin/plugins/{slot}` with `{"name": ..., "options": {...}}` — swap the slot's plugin
  at the next step boundary (`Engine.swap`); answers once the swap took effect.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pydantic
from fastapi import APIRouter, Depends, Request
from pegboard.core.plugin_manager import OptionsError, PluginError, UnknownPluginError
from pegboard.core.server.errors import APIError
from pegboard.core.server.protocol import ErrorResponse
from pegboard.core.server.security import require_admin
from pegboard.core.server.swap_options import check_swap_options
from pegboard.core.swap import SwapError
from pegboard.sdk.slots import SLOTS

router = APIRouter(
    prefix="/admin",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses={s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409, 422, 503)},
)


class SwapBody(pydantic.BaseModel):
    """Which plugin takes over a slot, with its options (validated by the plugin's model)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(min_length=1)
    options: dict[str, Any] = pydantic.Field(default_factory=dict)


class SwapResponse(pydantic.BaseModel):
    """A swap that took effect."""

    slot: str
    previous: str | None
    active: str
    drained: bool


@router.get("/plugins")
async def list_plugins(http: Request) -> dict[str, Any]:
    """Active plugin per slot, every discovered plugin with its state, applied patches."""
    engine = http.app.state.server.require_engine().engine
    return plugin_report(engine)


@router.post("/plugins/{slot}", response_model=SwapResponse)
async def swap_plugin(slot: str, body: SwapBody, http: Request) -> SwapResponse:
    """Swap `slot` to `body.name` at the next step boundary; in-flight requests are kept."""
    engine = http.app.state.server.require_engine()
    if slot not in SLOTS:
        raise APIError(404, f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}", "slot")
    check_swap_options(engine.engine.plugins, slot, body.name, body.options)  # paths: 403
    try:
        future = engine.swap(slot, body.name, **body.options)
    except OptionsError as e:
        raise APIError(422, str(e), "options") from e
    except UnknownPluginError as e:
        raise APIError(404, str(e), "name") from e
    except (PluginError, SwapError) as e:  # failed to load, disabled, or a multi-plugin slot
        raise APIError(400, str(e), "name") from e
    try:
        result = await asyncio.wrap_future(future)
    except SwapError as e:
        raise APIError(409, str(e), "name") from e
    return SwapResponse(
        slot=result.slot, previous=result.previous, active=result.active, drained=result.drained
    )


def plugin_report(engine) -> dict[str, Any]:
    """What `GET /admin/plugins` answers."""
    pm = engine.plugins
    active = {}
    for slot, spec in SLOTS.items():
        plugins = [p.name for p in pm.active_all(slot)]
        active[slot] = plugins if spec.multi else (plugins[0] if plugins else None)
    errors = engine.guard.errors
    plugins = []
    for info in pm.list_plugins():
        record = info.to_dict()
        record["errors"] = errors.get((info.slot, info.name), 0)
        plugins.append(record)
    return {
        "active": active,
        "plugins": plugins,
        "plugin_errors": [
            {"slot": slot, "plugin": name, "errors": n} for (slot, name), n in errors.items()
        ],
        "patches": {"applied": engine.patches.applied, "skipped": engine.patches.skipped},
    }
