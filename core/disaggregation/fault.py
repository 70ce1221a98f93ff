"""Test-only fault injection: hold KV transfers in flight so a test can kill the prefill
engine while one provably is (tests/test_pd_serving.py). Off unless the variable is set; never
set it in production.

With `PEGBOARD_PD_TEST_HOLD_TRANSFERS=DIR` in its environment, a prefill engine posts each
transfer as usual (the decode engine's pages are registered, the copies are handed to the
plugin) but does not complete it: it writes `DIR/held-<room>` and keeps the transfer in
`TRANSFERRING` (no `done` reaches the decode engine) until a file `DIR/release` exists.
"""

from __future__ import annotations

import os
from pathlib import Path

HOLD_ENV = "PEGBOARD_PD_TEST_HOLD_TRANSFERS"


class TransferHold:
    """The hold of one prefill engine (see the module docstring)."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.marked: set[int] = set()

    @classmethod
    def from_env(cls) -> TransferHold | None:
        directory = os.environ.get(HOLD_ENV)
        return cls(directory) if directory else None

    def holds(self, room: int) -> bool:
        """True while the transfer of `room` must not complete; marks it held once."""
        if (self.directory / "release").exists():
            return False
        if room not in self.marked:
            self.marked.add(room)
            (self.directory / f"held-{room}").touch()
        return True
