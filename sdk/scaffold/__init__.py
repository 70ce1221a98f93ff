"""The plugin scaffold behind `pegboard plugin new NAME --slot SLOT`.

It writes a pip-installable package `pegboard-NAME/`: a pyproject whose entry point in the group
`pegboard.plugins` names the plugin class, a module with a small working implementation of the
slot, and a test that runs the conformance kit (`pegboard.sdk.testing`) — so the package passes
its own tests as generated. Templates live in `template/<slot>/` and `template/common/`; their
`${...}` fields are filled with `string.Template`.
"""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

import importlib_metadata
from pegboard.sdk.slots import SLOTS

#: Slots with a template; the rest have no minimal implementation worth generating yet.
TEMPLATED_SLOTS = (
    "scheduler",
    "kv_cache",
    "attention",
    "sampler",
    "metrics",
    "router",
    "transfer",
    "linear",
    "speculator",
    "expert_placement",
)
_NAME = re.compile(r"^[a-z][a-z0-9]*(-[a-z0-9]+)*$")
_CLASS_SUFFIX = {
    "scheduler": "Scheduler",
    "kv_cache": "Cache",
    "attention": "Attention",
    "sampler": "Sampler",
    "metrics": "Exporter",
    "router": "Router",
    "transfer": "Transfer",
    "linear": "Linear",
    "speculator": "Speculator",
    "expert_placement": "Placement",
}


class ScaffoldError(ValueError):
    """The package cannot be generated (bad name, unsupported slot, existing directory)."""


def create_plugin_package(name: str, slot: str, directory: Path | str = ".") -> Path:
    """Write `pegboard-<name>/` under `directory` and return its path."""
    if not _NAME.match(name):
        raise ScaffoldError(
            f"invalid plugin name {name!r}: use lowercase letters, digits and single dashes, "
            "starting with a letter (e.g. fair-share)"
        )
    if slot not in TEMPLATED_SLOTS:
        known = "unknown slot" if slot not in SLOTS else "no template for slot"
        raise ScaffoldError(f"{known} {slot!r}; templates exist for: {', '.join(TEMPLATED_SLOTS)}")
    root = Path(directory) / f"pegboard-{name}"
    if root.exists() and any(root.iterdir()):
        raise ScaffoldError(f"{root} already exists and is not empty")
    module = "pegboard_" + name.replace("-", "_")
    fields = {
        "name": name,
        "slot": slot,
        "distribution": f"pegboard-{name}",
        "module": module,
        "cls": _class_name(name, _CLASS_SUFFIX[slot]),
        "base": SLOTS[slot].base.__name__,
        "hook": SLOTS[slot].hook,
        "flag": SLOTS[slot].flag,
        "pegboard_version": importlib_metadata.version("pegboard"),
    }
    files = {
        "pyproject.toml": "common/pyproject.toml.tmpl",
        "README.md": "common/README.md.tmpl",
        f"src/{module}/__init__.py": f"{slot}/plugin.py.tmpl",
        f"tests/test_{module}.py": f"{slot}/test_plugin.py.tmpl",
    }
    template_dir = resources.files(__name__) / "template"
    for target, source in files.items():
        text = Template(template_dir.joinpath(source).read_text()).substitute(fields)
        path = root / target
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def _class_name(name: str, suffix: str) -> str:
    """`fair-share` -> `FairShareScheduler`; a name already ending in the suffix keeps it once."""
    camel = "".join(part.capitalize() for part in name.split("-"))
    return camel if camel.endswith(suffix) else camel + suffix
