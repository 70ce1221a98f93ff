"""The engine-wide switch that turns speculation off for whole steps where it does not pay.

A verify step costs more than a decode step: the target computes every draft, and the step
cannot replay a decode CUDA graph. Rejected drafts buy nothing for that, and the larger the
batch, the more the extra tokens cost. Two rules decide, once per step, whether the step asks
the speculator for drafts at all:

- **Batch size** (`--speculative-disable-by-batch-size N`, vLLM's flag): a step with N or more
  scheduled requests runs without drafts.
- **Acceptance** (`--speculative-min-accept-rate R`): over the last `WINDOW` verify steps, the
  share of draft tokens accepted. Below R (once `MIN_SAMPLES` verify steps are seen),
  speculation turns off for `COOLDOWN` steps, then probes again with drafts; each probe that
  is still below R doubles the cooldown (up to `MAX_COOLDOWN`), so a workload the speculator
  never guesses pays for at most a few verify steps in every `MAX_COOLDOWN`. A probe at or above
  R turns it back on and resets the cooldown.

The per-request back-off of `step.py` works underneath: it stops one request that keeps
missing; this switch stops the whole batch when speculation as a whole does not help.
"""

from __future__ import annotations

from collections import deque

WINDOW = 8
MIN_SAMPLES = 4
COOLDOWN = 16
MAX_COOLDOWN = 256


class SpeculationSwitch:
    """Per-step on/off decision (see the module docstring)."""

    def __init__(self, disable_batch_size: int | None, min_accept_rate: float) -> None:
        self.disable_batch_size = disable_batch_size
        self.min_accept_rate = min_accept_rate
        self._window: deque[tuple[int, int]] = deque(maxlen=WINDOW)  # (drafted, accepted)
        self._off_for = 0  # steps left without drafts
        self._cooldown = COOLDOWN
        #: Counters for metrics (`pegboard:spec_switch_*`): steps run without drafts by each
        #: rule, and the times the acceptance rule turned speculation off.
        self.off_steps = {"accept_rate": 0, "batch_size": 0}
        self.num_turned_off = 0

    @property
    def num_off_steps(self) -> int:
        """Steps this switch ran without drafts (both rules)."""
        return sum(self.off_steps.values())

    def reset(self) -> None:
        """Forget the acceptance seen so far (another speculator was swapped in)."""
        self._window.clear()
        self._off_for = 0
        self._cooldown = COOLDOWN

    @property
    def on(self) -> bool:
        """Whether the acceptance rule lets speculation run (the batch rule is per step)."""
        return self._off_for == 0

    def may_allow(self, batch_size: int) -> bool:
        """Whether the next step, of about `batch_size` requests, may draft (`allows` without
        counting anything)."""
        if self._off_for > 0:
            return False
        return not (self.disable_batch_size and batch_size >= self.disable_batch_size)

    def allows(self, batch_size: int) -> bool:
        """Called once per step with the scheduled requests' count: whether to draft."""
        if self._off_for > 0:
            self._off_for -= 1
            self.off_steps["accept_rate"] += 1
            return False
        if self.disable_batch_size and batch_size >= self.disable_batch_size:
            self.off_steps["batch_size"] += 1
            return False
        return True

    def record(self, drafted: int, accepted: int) -> None:
        """One verify step's draft and accepted tokens (all requests)."""
        if drafted <= 0 or self.min_accept_rate <= 0:
            return
        self._window.append((drafted, accepted))
        if len(self._window) < MIN_SAMPLES:
            return
        rate = sum(a for _, a in self._window) / sum(d for d, _ in self._window)
        if rate < self.min_accept_rate:
            self._off_for = self._cooldown
            self._cooldown = min(2 * self._cooldown, MAX_COOLDOWN)
            self._window.clear()  # the probe after the cooldown judges on fresh figures
            self.num_turned_off += 1
        else:
            self._cooldown = COOLDOWN
