"""Real model configs bundled for benchmarks with random weights (`--random-weights --config`)."""

from __future__ import annotations

import json
import tempfile
from importlib import resources
from pathlib import Path


def bundled_configs() -> list[str]:
    return sorted(
        p.name.removesuffix(".json")
        for p in resources.files("pegboard.core").joinpath("configs").iterdir()
        if p.name.endswith(".json")
    )


def config_model_dir(name: str) -> Path:
    """A directory holding only `config.json` of the bundled config `name`, for
    `load_format="dummy"` (the engine then draws random weights on the target device)."""
    if name not in bundled_configs():
        raise ValueError(f"unknown config {name!r}; bundled: {', '.join(bundled_configs())}")
    raw = json.loads(resources.files("pegboard.core").joinpath(f"configs/{name}.json").read_text())
    out = Path(tempfile.mkdtemp(prefix=f"pegboard-{name}-"))
    (out / "config.json").write_text(json.dumps(raw))
    return out


def random_weights_model_dir(config: str) -> Path:
    """`config_model_dir` for a bundled config name, or a directory holding only a copy of
    `config` when it is a path to a `config.json` (or to a directory that has one)."""
    path = Path(config)
    if path.is_dir():
        path = path / "config.json"
    if path.is_file():
        out = Path(tempfile.mkdtemp(prefix="pegboard-config-"))
        (out / "config.json").write_text(path.read_text())
        return out
    return config_model_dir(config)
