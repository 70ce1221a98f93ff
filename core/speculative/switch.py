"""The engine-wide switch that turns speculation off for whole steps where it does not pay.

A verify step costs more than a decode step: the target computes every draft, and the step
cannot replay a decode CUDA graph. Rejected drafts buy nothing for that, and the larger the
batch, the more the extra tokens cost. Three rules decide, once per step, whether the step
asks the speculator for drafts at all:

- **Batch size** (`--speculative-disable-by-batch-size N`, vLLM's flag): a step with N or more
  scheduled requests runs without drafts.
- **Acceptance** (`--speculative-min-accept-rate R`): over the last `WINDOW` verify steps, the
  share of draft tokens accepted. Below R (once `MIN_SAMPLES` verify steps, or verifies of
  `MIN_VERIFIES` requests, are seen: a large batch's one verify step samples many requests'
  drafts, and each further one costs it ~2.6 plain steps), speculation turns off for
  `COOLDOWN` steps, then probes again with drafts; each probe that is still below R doubles
  the cooldown (up to `MAX_COOLDOWN`), so a workload the speculator never guesses pays for at
  most a few verify steps in every `MAX_COOLDOWN` (a batch of 16 or more drafting requests:
  one verify step per probe, and the cooldown starts at `LARGE_BATCH_COOLDOWN`: such a probe
  costs several plain steps). A probe at or above R turns it back on and resets the cooldown.
  **A probe of a large batch is a trial**: the first step that may draft (of the run, and
  after every cooldown) asks drafts of only `TRIAL_REQUESTS` of its requests (the next ones
  in turn each trial, so every request gets sampled), enough to judge at once; the others
  draft from the step after a trial that passed. At batch 64 on the H200 each probe that
  asked all 64 requests cost 18-34 ms against a 1.9 ms plain step (session 18: an EAGLE
  head's eager catch-up over every request's pairs decoded while it was off); a trial does
  a quarter of that catch-up and drafting (its verify forward still replays the batch's
  padded graph) for a verdict just as clear.
  A draft tree counts as many draft tokens as its depth, not its size: the target accepts at
  most one path, so a tree of 15 nodes and depth 4 that is accepted to its leaves is as good
  as a chain of 4 accepted whole, and dividing by 15 would read it as 27 % and switch off trees
  that pay (`Speculation.verify`; the metrics still count every drafted token).

- **Speed** (`--speculative-min-speedup S`; on CUDA `DEFAULT_MIN_SPEEDUP` = 1.0 unless set,
  0 turns it off; off on other devices, where the engine is the correctness reference and a
  draft schedule must not depend on the clock): drafts that are accepted can still lose, when
  a verify step costs more than the tokens it adds. A verify step cannot overlap the host's
  work with the device's (`step.py`), so on a small model at batch 64 one costs ~2.2 plain
  steps (docs/benchmarks.md, session 8: n-gram accepted 76 %, yet 0.55x plain speed). The
  engine times every decode step (of a cooldown only the last `TIMED_OFF_STEPS`) by the wall
  clock from its start to the next step's start (`begin_step`: the same requests in both), so
  a step's time holds its device work: a step that may draft reads its tokens before the next
  step starts, and a plain step in a run of plain steps waits for the one before it (overlap
  scheduling). The first plain step of a run (it
  has no earlier step to wait for) and the last (it reads its tokens at once, as the next step
  may draft) are left out, and so is the first step of a run that may draft (it pays for the
  change: a draft model or EAGLE head catches up on the tokens decoded without it, eagerly),
  and the step after a trial (where the requests the trial left out catch up). Output tokens
  per second over the last `WINDOW` steps of each kind, in batches of the same size bucket
  (`_bucket`: 33-64 requests, 17-32, ...; a batch of 64 yields far more tokens per second
  than one of 1, so a warm-up's figure must not judge it), are compared after each step that
  may draft:
  - before the first step that would draft in a bucket with no plain figure yet, and every
    `probe_every` steps with drafts (`PROBE_EVERY`, doubling up to `MAX_PROBE_EVERY` while
    speculation keeps winning), `PROBE_STEPS` (+ 2 uncounted) steps run without drafts to
    measure plain decoding;
  - below S times the plain rate (over `MIN_SPEED_SAMPLES` steps with drafts, or one that is
    below `DECISIVE` of it: at batch 64 each probe then costs two verify steps), drafting
    stops for a cooldown as with acceptance (16 steps, doubling up to 256 while it keeps
    losing), whose plain steps refresh the plain figure;
  - a probe after that turns drafting back on only at S * (1 + `HYSTERESIS`): a workload near
    S does not flap (each flip costs an un-overlapped step).
  Outputs never change (verification is lossless): the clock only decides which steps draft.

- **Probe cost** (with the speed rule's clock): the doubling above takes no account of what a
  probe costs, and at batch 64 a trial that misses cost 11-19 ms against a 2.7 ms plain step
  (the head's catch-up and an un-overlapped verify; H200, session 20), so trials every 256 steps
  cost ~3 % of the run. Every step that could draft is charged what it lost against plain
  decoding at its bucket's plain rate (its seconds less its output tokens' plain seconds, each
  run of such steps from its first); when either rule turns drafting off, the cooldown lasts
  at least until that run's loss is `PROBE_SHARE` (1 %) of the time decoded plain meanwhile
  (`loss / (PROBE_SHARE * plain step)` steps, up to `MAX_PROBE_COOLDOWN`). A probe that costs
  little keeps the doubling's cooldowns; one that costs 9 plain steps waits 900.

The per-request back-off of `step.py` works underneath: it stops one request that keeps
missing; this switch stops the whole batch when speculation as a whole does not help.
"""

from __future__ import annotations

import math
import operator
from collections import deque

WINDOW = 8
MIN_SAMPLES = 4
MIN_VERIFIES = 16  # ... or verifies of this many requests in the window: enough to judge
COOLDOWN = 16
MAX_COOLDOWN = 256
#: The first cooldown after a verify step of `MIN_VERIFIES` or more drafting requests is judged
#: low: at batch 64 on the H200 (Qwen3-0.6B, session 9) a probe whose drafts all miss cost
#: ~2.4 plain steps more than a plain step (the verify, and the un-overlapped steps around it),
#: so probing after 16 and 32 steps cost ~5 % of a 256-step run; after 64, 128: half of that.
LARGE_BATCH_COOLDOWN = 64
#: Requests that draft in a trial (see the module docstring): a verify step of this many
#: drafting requests is judged at once.
TRIAL_REQUESTS = MIN_VERIFIES
DEFAULT_MIN_SPEEDUP = 1.0  # the speed rule on CUDA when --speculative-min-speedup is not set
PROBE_STEPS = 3  # counted steps without drafts that measure plain decoding (the speed rule)
PROBE_EVERY = 64  # steps with drafts between those probes, doubling while speculation wins ...
MAX_PROBE_EVERY = 1024  # ... up to this
MIN_SPEED_SAMPLES = 2  # steps of each kind before the speed rule judges ...
DECISIVE = 0.75  # ... unless one step with drafts yields less than this share of what it must
HYSTERESIS = 0.05  # once the speed rule turned drafting off, a probe needs S * (1 + this)
#: The speed rule times only the last this many steps of a cooldown: its window keeps the last
#: `WINDOW` plain steps (the first timed step has no timed step before it, the last reads its
#: tokens at once: both left out), so timing the earlier ones (up to 250 of a 256-step
#: cooldown) would only be host work in steps that must cost what a plain step costs.
TIMED_OFF_STEPS = WINDOW + 2
#: On the speed rule's clock, a cooldown after a probe that turned speculation off lasts at
#: least as long as it takes for the time that probe lost against plain decoding to be this
#: share of the time decoded plain until the next probe (the doubling above sets its floor) ...
PROBE_SHARE = 0.01
#: ... up to this many steps. At batch 64 on the H200 (session 20) a trial that misses cost
#: 11-19 ms over a 2.7 ms plain step: ~400-700 steps, against the doubling's 64-256.
MAX_PROBE_COOLDOWN = 4096


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
        self.min_speedup = min_speedup or None  # (0: off)
        #: Recent verify steps: (draft tokens, accepted tokens, drafting requests).
        self._window: deque[tuple[int, int, int]] = deque(maxlen=WINDOW)
        self._off_for = 0  # steps left without drafts
        self._off_reason = "accept_rate"  # the rule that set `_off_for`
        self._cooldown = COOLDOWN
        #: The speed rule's figures per batch-size bucket (`_bucket`): (output tokens,
        #: seconds) of the last decode steps that could draft (True) and of plain ones (False).
        self._speed: dict[int, dict[bool, deque[tuple[int, float]]]] = {}
        self._judged = 0  # the bucket judged last (`speeds`)
        self._speed_cooldown = COOLDOWN  # the speed rule's own (acceptance may be fine)
        self._speed_on = True  # its last verdict (a probe after "off" needs the hysteresis)
        self._probed = False  # no probe yet: plain decoding is measured before drafting
        self._since_probe = 0  # steps with drafts judged since the last probe
        self.probe_every = PROBE_EVERY
        #: The step being timed: (requests, could draft, output tokens, start, the kind of the
        #: decode step before it or None); and the kind of the last decode step.
        self._last: tuple[list, bool, int, float, bool | None] | None = None
        self._last_kind: bool | None = None
        #: Counters for metrics (`pegboard:spec_switch_*`): steps run without drafts by each
        #: rule, and the times the acceptance (or speed) rule turned speculation off.
        self.off_steps = {"accept_rate": 0, "batch_size": 0, "speed": 0}
        self.num_turned_off = 0
        self._trial = True  # the next step that may draft is a trial (no verdict since)
        self._trial_start = 0  # where among the drafting requests the next trial starts
        self.num_trials = 0  # trial steps run (tests, diagnostics)
        #: Seconds the current run of steps that could draft lost against plain decoding at
        #: the plain rate of their bucket (`_count_loss`), and whether a rule turned drafting
        #: off in the step being closed (its run's loss then sets the cooldown's length).
        self._run_loss = 0.0
        self._bound_pending = False

    @property
    def num_off_steps(self) -> int:
        """Steps this switch ran without drafts (every rule)."""
        return sum(self.off_steps.values())

    def reset(self) -> None:
        """Forget the acceptance and speed seen with drafts (another speculator was swapped
        in); the plain figure stands."""
        self._window.clear()
        self._off_for = 0
        self._cooldown = COOLDOWN
        for window in self._speed.values():
            window[True].clear()
        self._speed_cooldown, self._speed_on = COOLDOWN, True
        self._probed, self._since_probe, self.probe_every = False, 0, PROBE_EVERY
        self._last, self._last_kind = None, None
        self._trial = True
        self._run_loss, self._bound_pending = 0.0, False

    @property
    def off_for(self) -> tuple[int, str]:
        """Steps left without drafts and the rule that set them (diagnostics: a bench's trace)."""
        return self._off_for, self._off_reason

    @property
    def on(self) -> bool:
        """Whether the acceptance and speed rules let speculation run (the batch rule is per
        step)."""
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

    def trial(self, limits: list[int]) -> list[int]:
        """This step's draft limits per request (`limits`: what each may draft), cut to
        `TRIAL_REQUESTS` of the requests that may draft when the step is a trial (see the
        module docstring); `limits` itself otherwise."""
        if not self._trial or self.min_accept_rate <= 0:
            return limits
        drafting = [i for i, k in enumerate(limits) if k > 0]
        if len(drafting) <= TRIAL_REQUESTS:
            return limits
        start = self._trial_start % len(drafting)
        chosen = set((drafting + drafting)[start : start + TRIAL_REQUESTS])
        self._trial_start = start + TRIAL_REQUESTS
        self.num_trials += 1
        # the speed rule leaves out the step after it, as the first of a run: the requests
        # that did not draft in the trial catch up there (an EAGLE head, a draft model)
        self._last_kind = None
        return [k if i in chosen else 0 for i, k in enumerate(limits)]

    def record(self, drafted: int, accepted: int, requests: int = 1) -> None:
        """One verify step's draft and accepted tokens (all its `requests` drafting; a tree
        counts as the chain of its depth: `Speculation.verify`)."""
        if drafted <= 0 or self.min_accept_rate <= 0:
            return
        window = self._window
        window.append((drafted, accepted, requests))
        if len(window) < MIN_SAMPLES and sum(n for *_, n in window) < MIN_VERIFIES:
            return  # (no verdict yet: a trial goes on with the next requests)
        self._trial = False  # (a verdict that turns drafting off makes the next probe one)
        rate = sum(a for _, a, _ in window) / sum(d for d, _, _ in window)
        if rate < self.min_accept_rate:
            if max(n for *_, n in window) >= MIN_VERIFIES:  # a large batch's probe costs more
                self._cooldown = max(self._cooldown, LARGE_BATCH_COOLDOWN)
            self._off_for, self._off_reason = self._cooldown, "accept_rate"
            self._cooldown = min(2 * self._cooldown, MAX_COOLDOWN)
            self._turned_off()
        else:
            self._cooldown = COOLDOWN

    def _turned_off(self) -> None:
        self._window.clear()  # the probe after the cooldown judges on fresh figures
        self._trial = True
        for window in self._speed.values():
            window[True].clear()
        self.num_turned_off += 1
        self._bound_pending = True  # the probe's loss lengthens the cooldown (`_count_loss`)

    # ------------------------------------------------------------------ the speed rule

    def begin_step(self, requests: list, num_tokens: list[int], now: float) -> bool:
        """A step starts at `now` (wall-clock seconds) with `requests` scheduled to run
        `num_tokens` (before drafts: a decode step runs one each): whether it may draft
        (`allows`). The speed rule first closes the last step's measurement (and judges after
        a step that could draft), so its verdict holds for this step already; then times this
        one (in a cooldown, only its last `TIMED_OFF_STEPS` steps)."""
        timed = self.min_speedup is not None and self._off_for <= TIMED_OFF_STEPS
        if timed:
            self._close(requests, num_tokens, now)
            if self._off_for == 0 and _decode(num_tokens) and self._unknown(len(requests)):
                self._probe(_bucket(len(requests)))  # plain decoding first, then drafts
        else:
            last = self._last
            if last is not None and last[1] and last[2] > 0:  # a rule turned drafting off in it:
                self._count_loss(last, now)  # (its time holds its tokens' read: any next batch)
            self._last = self._last_kind = None  # (the next timed step starts a run)
        self._bound_pending = False
        on = self.allows(len(requests))
        if timed:
            self._open(requests, num_tokens, on, now)
        return on

    def _close(self, requests: list, num_tokens: list[int], now: float) -> None:
        """Count the last step's time when it was a decode step of the same requests (else the
        time between holds admissions, prefill or idling); a plain one only inside a run of
        plain steps (this one plain too: else the last read its tokens at once)."""
        last, self._last = self._last, None
        if last is None or last[2] <= 0 or not _same(last[0], requests):
            return
        _, could, tokens, start, before = last
        bucket = _bucket(len(requests))
        window = self._speed.get(bucket)
        if window is None:
            window = self._speed[bucket] = {True: deque(maxlen=WINDOW), False: deque(maxlen=WINDOW)}
        if could:
            if before is True:  # (the first of a run pays for the change: a draft model's or
                window[True].append((tokens, now - start))  # EAGLE head's catch-up)
            self.judge_speed(bucket)
            self._count_loss(last, now)
        elif before is False and _decode(num_tokens) and not self.may_allow(len(requests)):
            window[False].append((tokens, now - start))

    def _count_loss(self, last: tuple, now: float) -> None:
        """Add the closed step `last`, which could draft, to its run's loss against plain
        decoding: its seconds less the time its output tokens take at the plain rate of its
        bucket (a verify step whose drafts all miss loses what it costs beyond a plain step; one
        that wins adds a negative loss). When a rule turned drafting off in it (the
        acceptance rule while it verified, the speed rule as it was judged), lengthen the
        cooldown to what `PROBE_SHARE` asks of that loss: after a probe that costs as much as
        `n` plain steps, at least `n / PROBE_SHARE` steps without drafts (up to
        `MAX_PROBE_COOLDOWN`), so probing a speculator that keeps missing costs ~1 % at most."""
        requests, _, tokens, start, before = last
        window = self._speed.get(_bucket(len(requests)))
        rate = _rate(window[False]) if window is not None else 0.0
        if rate <= 0:
            return  # (no plain figure: nothing to weigh the loss by)
        if before is not True:
            self._run_loss = 0.0  # the first step of a run
        self._run_loss += (now - start) - tokens / rate
        if self._bound_pending and self._off_for > 0:
            plain_step = len(requests) / rate
            steps = math.ceil(self._run_loss / (PROBE_SHARE * plain_step))
            self._off_for = max(self._off_for, min(steps, MAX_PROBE_COOLDOWN))
            self._bound_pending = False

    def _open(self, requests: list, num_tokens: list[int], on: bool, now: float) -> None:
        if _decode(num_tokens):
            self._last = (requests, on, len(requests), now, self._last_kind)
            self._last_kind = on
        else:
            self._last_kind = None

    def tokens(self, n: int) -> None:
        """The output tokens of this step's verify (all its requests, each draft accepted
        and the target's own token): what `begin_step` credits the step with."""
        if self._last is not None:
            self._last = (self._last[0], self._last[1], n, *self._last[3:])

    def judge_speed(self, bucket: int) -> None:
        """After a step that could draft, of a batch in `bucket`: probe plain steps when due
        (no plain figure for this bucket, or `probe_every` steps since the last probe), else
        turn speculation off when it yields fewer tokens per second than `min_speedup` times
        plain decoding in batches of the same bucket (`HYSTERESIS` above it once the rule
        turned it off)."""
        if self.min_speedup is None or self._off_for > 0:
            return
        self._since_probe += 1
        self._judged = bucket
        spec, plain = self._speed[bucket][True], self._speed[bucket][False]
        unknown = len(plain) < MIN_SPEED_SAMPLES
        if self._unknown(bucket) or self._since_probe >= self.probe_every:
            if not unknown:  # a periodic probe: speculation kept winning since the last
                self.probe_every = min(2 * self.probe_every, MAX_PROBE_EVERY)
            self._probe(bucket)
            return
        base = _rate(plain)
        if unknown or not spec or base <= 0:
            return
        need = self.min_speedup * (1.0 if self._speed_on else 1.0 + HYSTERESIS)
        ratio = _rate(spec) / base
        if ratio >= need:
            if len(spec) >= MIN_SPEED_SAMPLES:
                self._speed_on, self._speed_cooldown = True, COOLDOWN
            return
        if len(spec) < MIN_SPEED_SAMPLES and ratio >= DECISIVE * need:
            return  # one step: not clear enough yet
        self._speed_on = False
        self._off_for, self._off_reason = self._speed_cooldown, "speed"
        self._speed_cooldown = min(2 * self._speed_cooldown, MAX_COOLDOWN)
        self._turned_off()
        self.probe_every, self._since_probe = PROBE_EVERY, 0  # the cooldown measures plain

    def _unknown(self, batch_size: int) -> bool:
        """Whether plain decoding must be measured for batches of `batch_size` (no figure for
        its bucket; after a probe whose steps changed requests, again a few steps later)."""
        window = self._speed.get(_bucket(batch_size))
        if window is not None and len(window[False]) >= MIN_SPEED_SAMPLES:
            return False
        return not self._probed or self._since_probe > 2 * PROBE_STEPS

    def _probe(self, bucket: int) -> None:
        """Run `PROBE_STEPS` counted steps without drafts (+ the first and last of the run)."""
        self._probed, self._since_probe = True, 0
        if bucket in self._speed:
            self._speed[bucket][False].clear()
        self._off_for, self._off_reason = PROBE_STEPS + 2, "speed"

    @property
    def speeds(self) -> dict[str, float]:
        """The speed rule's last figures: output tokens per second with and without drafts in
        the batch-size bucket it judged last."""
        window = self._speed.get(self._judged, {True: (), False: ()})
        return {
            "spec_tokens_per_s": _rate(window[True]),
            "plain_tokens_per_s": _rate(window[False]),
        }


def _rate(window) -> float:
    seconds = sum(t for _, t in window)
    return sum(n for n, _ in window) / seconds if seconds > 0 else 0.0


def _bucket(batch_size: int) -> int:
    """The batch-size bucket the speed rule compares within (a power of two: 1, 2, 4, 8, ...):
    tokens per second grow with the batch, so a batch of 64 is judged against plain batches
    of 33-64 requests, not against the batch-1 figure a warm-up left."""
    return 1 << (batch_size - 1).bit_length()


def _decode(num_tokens: list[int]) -> bool:
    return sum(num_tokens) == len(num_tokens)  # every request runs one token (each runs >= 1)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(map(operator.is_, a, b))
