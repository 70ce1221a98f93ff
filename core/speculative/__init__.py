"""Speculative decoding, the engine's side (the `speculator` slot proposes; see `step`)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pegboard.core.speculative.step import Speculation, check_drafts

__all__ = ["Speculation", "SpeculatorError", "check_drafts", "check_speculator"]

log = logging.getLogger("pegboard.speculative")


class SpeculatorError(ValueError):
    """The selected speculator cannot serve this target or these settings (raised before the
    model loads)."""


def check_speculator(plugins, config, model_dir: Path) -> None:
    """Before the target loads: let the selected speculator check the target's config (a
    draft's vocabulary and hidden size) and refuse settings speculation does not support.
    Overlap scheduling stays on for the steps that do not draft (`Speculation.needs_tokens`)."""
    name = config.speculator
    if not name:
        return
    if config.tp_size > 1:
        raise SpeculatorError(
            "speculative decoding does not run with tensor parallelism yet (--tp-size > 1)"
        )
    cls = plugins.find("speculator", name).cls
    options = plugins.validate_options("speculator", name, config.plugin_options.get(name))
    target = _read_config(model_dir)
    if target is not None:
        try:
            cls.check_target(target, options)
        except ValueError as e:
            raise SpeculatorError(f"speculator {name!r}: {e}") from e
    if not config.disable_overlap:
        log.info(
            "speculative decoding: steps that draft read their tokens before the next step is "
            "prepared; overlap scheduling runs while the speculation switch is off"
        )


def _read_config(model_dir: Path) -> dict | None:
    path = Path(model_dir) / "config.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # the model runner reports a missing or broken checkpoint
