"""The one error model loading raises."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model directory cannot be served: unsupported architecture, a missing or corrupt file,
    a missing or mis-shaped tensor, or a config value the implementation cannot honour.

    The message names the file or config field at fault."""
