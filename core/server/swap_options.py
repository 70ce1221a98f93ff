"""Which plugin options a swap over HTTP may set.

An option that names a file or directory the engine would load from (prebuilt kernels, a
shared library, weights) can only be set when the server starts, by whoever runs it: over HTTP
it would let an admin-token holder make the engine load native code or files of their
choosing. Such an option is start-time only when its pydantic field says so —
`Field(..., json_schema_extra={"start_time_only": True})` — or when its name ends in `_dir`,
`_path` or `_file`. `POST /admin/plugins/{slot}` answers 403 for them.
"""

from __future__ import annotations

from typing import Any

from pegboard.core.server.errors import APIError

PATH_SUFFIXES = ("_dir", "_path", "_file")


def start_time_only(name: str, field: Any) -> bool:
    extra = getattr(field, "json_schema_extra", None)
    marked = isinstance(extra, dict) and bool(extra.get("start_time_only"))
    return marked or name.endswith(PATH_SUFFIXES)


def check_swap_options(plugins: Any, slot: str, name: str, options: dict[str, Any]) -> None:
    """403 if `options` sets a start-time-only option of plugin `name` (unknown plugins and
    options are left to the swap's own validation)."""
    try:
        fields = plugins.find(slot, name).cls.Options.model_fields
    except Exception:
        return
    by_alias = {f.alias: n for n, f in fields.items() if f.alias}
    for key in options:
        field_name = by_alias.get(key, key)
        field = fields.get(field_name)
        if field is not None and start_time_only(field_name, field):
            flag = f"--{name}-{field_name.replace('_', '-')}"
            raise APIError(
                403,
                f"option {key!r} of {slot} {name!r} can only be set when the server starts "
                f"({flag}): a swap over HTTP may not make the engine load files or native code "
                "from a path it names",
                f"options.{key}",
            )
