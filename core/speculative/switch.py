"""The engine-wide switch that turns speculation off for whole steps where it does not pay.

A verify step costs more than a decode step: the target computes every draft, and the step
cannot replay a decode CUDA graph. Rejected drafts buy nothing for that, and the larger the
batch, the more the extra tokens cost. Two rules decide, once per step, whether the step asks
the speculator for drafts at all:

- **Batch size** (`--speculative-disable-by-batch-size N`, vLLM's flag): a step with N or more
  scheduled requests runs without drafts.
- **Acceptance** (`--speculative-min-accept-rate R`): over the last `WINDOW` verify steps, the
  share of draft tokens accepted. Below R (once `MIN_SAMPLES` verify steps, or verifies of
  `MIN_VERIFIES` requests, are seen: a large batch's one verify step samples many requests'
  drafts, and each further one costs it ~2.6 plain steps), speculation turns off for
  `COOLDOWN` steps, then probes again with drafts; each probe that is still below R doubles
  the cooldown (up to `MAX_COOLDOWN`), so a workload the speculator never guesses pays for at
  most a few verify steps in every `MAX_COOLDOWN` (a batch of 16 or more drafting requests:
  one verify step per probe). A probe at or above
  R turns it back on and resets the cooldown.

- **Speed** (`--speculative-min-speedup S`, off by default): drafts that are accepted can still
  lose, when a verify step costs more than the tokens it adds (on a small model a verify step
  cannot overlap the host's work with the device's: docs/benchmarks.md, session 7). The
  engine times every decode step (from one step's start to the next's, the same requests in
  both: `observe`) with speculation on and off and compares output tokens per second over the
  last `WINDOW` of each. With no figure for plain steps yet, and every `probe_every` verify
  steps after that (`PROBE_EVERY`, doubling up to `MAX_PROBE_EVERY` while speculation keeps
  winning), it runs `PROBE_STEPS` steps without drafts to measure them (the first of a run of
  either kind is not counted: it pays for the change). Below S times the plain rate,
  speculation turns off for a cooldown as with acceptance, and the plain steps of the cooldown
  refresh the plain figure the next probe with drafts is judged against.

The per-request back-off of `step.py` works underneath: it stops one request that keeps
missing; this switch stops the whole batch when speculation as a whole does not help.
"""

from __future__ import annotations

import operator
from collections import deque

WINDOW = 8
MIN_SAMPLES = 4
MIN_VERIFIES = 16  # ... or verifies of this many requests in the window: enough to judge
COOLDOWN = 16
MAX_COOLDOWN = 256
PROBE_STEPS = 4  # steps without drafts that measure plain decoding (the speed rule)
PROBE_EVERY = 64  # verify steps between those probes, doubling while speculation wins ...
MAX_PROBE_EVERY = 1024  # ... up to this


class SpeculationSwitch:
    """Per-step on/off decision (see the module docstring)."""

    def __init__(
        self,
        disable_batch_size: int | None,
        min_accept_rate: float,
        min_speedup: float | None = None,
    ) -> None:
        self.disable_batch_size = disable_batch_size
        self.min_accept_rate = min_accept_rate
        self.min_speedup = min_speedup
        #: Recent verify steps: (draft tokens, accepted tokens, drafting requests).
        self._window: deque[tuple[int, int, int]] = deque(maxlen=WINDOW)
        self._off_for = 0  # steps left without drafts
        self._off_reason = "accept_rate"  # the rule that set `_off_for`
        self._cooldown = COOLDOWN
        #: The speed rule's figures: (output tokens, seconds) of the last decode steps with
        #: speculation on and off, verify steps since the last probe, and the last step's.
        self._speed: dict[bool, deque[tuple[int, float]]] = {
            True: deque(maxlen=WINDOW),
            False: deque(maxlen=WINDOW),
        }
        self._since_probe = 0
        self._speed_cooldown = COOLDOWN  # the speed rule's own (acceptance may be fine)
        self._probed = False  # the first verify step probes plain steps at once
        self.probe_every = PROBE_EVERY
        self._last: tuple[list, bool, int, float] | None = None  # (requests, on, tokens, start)
        #: Counters for metrics (`pegboard:spec_switch_*`): steps run without drafts by each
        #: rule, and the times the acceptance (or speed) rule turned speculation off.
        self.off_steps = {"accept_rate": 0, "batch_size": 0, "speed": 0}
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
        self._speed[True].clear()
        self._since_probe, self.probe_every, self._last = 0, PROBE_EVERY, None
        self._probed, self._speed_cooldown, self._last_kind = False, COOLDOWN, None

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
            self.off_steps[self._off_reason] += 1
            return False
        if self.disable_batch_size and batch_size >= self.disable_batch_size:
            self.off_steps["batch_size"] += 1
            return False
        return True

    def record(self, drafted: int, accepted: int, requests: int = 1) -> None:
        """One verify step's draft and accepted tokens (all its `requests` drafting)."""
        if drafted <= 0 or self.min_accept_rate <= 0:
            return
        window = self._window
        window.append((drafted, accepted, requests))
        if len(window) < MIN_SAMPLES and sum(n for *_, n in window) < MIN_VERIFIES:
            return
        rate = sum(a for _, a, _ in window) / sum(d for d, _, _ in window)
        if rate < self.min_accept_rate:
            self._off_for, self._off_reason = self._cooldown, "accept_rate"
            self._cooldown = min(2 * self._cooldown, MAX_COOLDOWN)
            self._turned_off()
        else:
            self._cooldown = COOLDOWN

    def _turned_off(self) -> None:
        self._window.clear()  # the probe after the cooldown judges on fresh figures
        self._speed[True].clear()
        self.num_turned_off += 1

    # ------------------------------------------------------------------ the speed rule

    def observe(self, requests: list, num_tokens: list[int], on: bool, now: float) -> None:
        """A step starts at `now` (seconds) with `requests` scheduled to run `num_tokens` (a
        decode step: one each); `on`: it may draft. Closes the last step's
        measurement when it was a decode step of the same requests (else the time between
        includes admissions, prefill or idling) and of the same kind as the one before it."""
        if self.min_speedup is None:
            return
        last, self._last = self._last, None
        if last is not None and last[2] > 0 and _same(last[0], requests):
            self._speed[last[1]].append((last[2], now - last[3]))
        if sum(num_tokens) == len(num_tokens):  # every request decodes (each runs >= 1)
            kind = self._last_kind
            self._last_kind = on
            if kind == on:  # a run's first step pays for the change: not counted
                self._last = (requests, on, len(requests), now)
        else:
            self._last_kind = None

    _last_kind: bool | None = None

    def tokens(self, n: int) -> None:
        """The output tokens of this step's verify (all its requests, each draft accepted
        and the target's own token): what `observe` credits the step with."""
        if self._last is not None:
            self._last = (*self._last[:2], n, self._last[3])

    def judge_speed(self) -> None:
        """After a verify step: probe plain steps when due, else turn speculation off if it
        yields fewer tokens per second than `min_speedup` times plain decoding."""
        if self.min_speedup is None or self._off_for > 0:
            return
        self._since_probe += 1
        spec, plain = self._speed[True], self._speed[False]
        if not self._probed or self._since_probe >= self.probe_every:
            if self._probed:  # a periodic probe: speculation kept winning since the last
                self.probe_every = min(2 * self.probe_every, MAX_PROBE_EVERY)
            self._probed, self._since_probe = True, 0
            plain.clear()
            self._off_for, self._off_reason = PROBE_STEPS + 1, "speed"  # + the first, uncounted
            return
        if len(spec) < MIN_SAMPLES or len(plain) < MIN_SAMPLES:
            return  # (no plain figure: the probe's steps changed requests; judged later)
        if _rate(spec) < self.min_speedup * _rate(plain):
            self._off_for, self._off_reason = self._speed_cooldown, "speed"
            self._speed_cooldown = min(2 * self._speed_cooldown, MAX_COOLDOWN)
            self._turned_off()
            self.probe_every, self._since_probe = PROBE_EVERY, 0  # the cooldown measures plain
        else:
            self._speed_cooldown = COOLDOWN

    @property
    def speeds(self) -> dict[str, float]:
        """The speed rule's last figures: output tokens per second with and without drafts."""
        return {
            "spec_tokens_per_s": _rate(self._speed[True]),
            "plain_tokens_per_s": _rate(self._speed[False]),
        }


def _rate(window: deque[tuple[int, float]]) -> float:
    seconds = sum(t for _, t in window)
    return sum(n for n, _ in window) / seconds if seconds > 0 else 0.0


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))
