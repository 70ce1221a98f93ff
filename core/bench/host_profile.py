"""Where the host's time goes in an engine step: wall-clock ms per step for each phase.

`pegboard bench offline --profile-host` (and `scripts/profile_offline.py`) wrap the engine's
phases with timers for the timed run only (`HostProfile`, a context manager that puts every
wrapped attribute back on exit):

- `schedule`, `allocate_kv`, `sample`: the hook calls (the plugin and the engine's checks);
- `prepare`: laying the batch out (`ModelRunner.prepare`);
- `forward (launch)`: the model call; on a GPU the kernels are only launched. Its parts are
  also reported on their own: `forward: attention.prepare` (the backend's metadata upload),
  `forward: graph replay` (a decode step's CUDA-graph replay: static-input copies and the
  launch, the LM head included), `forward: mixed graph replay` (a mixed step's,
  `pegboard.core.cuda_graph_mixed`) and `forward: compute_logits` (the LM head of a step that
  runs it eagerly: prefill, mixed and verify steps); the rest of it is the eager model of
  a non-graph step and the logits rows; with TP, `forward: tp share batch` (rank 0 sending
  the step to the followers), of which `forward: tp plan message` (the host layout, through
  shared memory: includes waiting for a follower when the ring is full) and `forward: tp
  batch tensors` (the ids/positions/slots broadcast on the device group);
- `forward_by_kind`: the steps of each kind (`decode`: one new token per request; `verify`:
  speculative drafts verified; `mixed`: prefill tokens next to decodes; `prefill`: no request
  decodes) and their own
  `forward (launch)` ms per step, which shows what mixed steps cost next to decode steps;
  `host_ms_by_kind`: their host work per step (the step less its wait for tokens, without
  the take between steps): `host_ms_per_step` averages over all steps, so a few eager
  prefill steps blocked in their launch raise it for every step;
- `sample: ...` (inside `sample`, where the active sampler has them: the standard sampler's
  `batch facts` (its per-batch parameters, recomputed when the batch changed), `gumbel` (the
  Gumbel path: seeds, their upload, the launch), `seeds`, and `kernel launch` (the Gumbel
  module's two Triton launches and their outputs' allocation); `sample: check` is the core's
  check of the sampler's output;
- `resolve`: applying the previous step's tokens, of which `wait for tokens` is the host
  waiting for the device (overlap: the device was the bottleneck for that long);
- `admit` (moving scheduled requests to running), `detokenize` (the deltas handed to the
  detokenizer: text and stop strings when it runs inline; sending the token ids with
  `--detokenizer process`), `detokenize: take (between steps)` (`LLM.run` collecting the text
  deltas after each step: applying the detokenizer process's answers), `step snapshot` (the
  step's metrics), `kv commit`, `export_metrics`, `inbox`, and `step (total)`;
- with a speculator: `speculation: propose` (the hook, the limits and checks, drafts appended),
  `speculation: mark_rows` (the verify rows, a tree's positions), `speculation: verify`
  (verification and the tokens appended), of which `speculation: verify: wait for target
  tokens` is the host waiting for the verify forward (a wait like `resolve`'s: not host work;
  `device_wait_ms_per_step` and `host_ms_by_kind` count it as a wait).

`host_ms` is a step's total less the wait, plus the take between steps: the host work per step. With overlap on, a step
whose host work is below the device's time per step shows the wait growing, not the total.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable

from pegboard.core.overlap import PendingStep

WAIT = "resolve: wait for tokens"
#: A verify step reading the target's tokens (inside `speculation: verify`): a wait, like WAIT.
SPEC_WAIT = "speculation: verify: wait for target tokens"
TOTAL = "step (total)"
#: `LLM.run` taking the text deltas between steps, on the loop's thread: outside `step` but host
#: work of the loop (with `--detokenizer process`, applying the process's answers).
TAKE = "detokenize: take (between steps)"


class HostProfile:
    """Time an engine's phases while the context is open; `report()` gives ms per step."""

    def __init__(self, engine, clock: Callable[[], float] = time.perf_counter) -> None:
        self.engine = engine
        #: Wall clock by default; `time.thread_time` counts only this thread's CPU time (for a
        #: shared machine, where other processes' load would otherwise land on every phase).
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self._restore: list[Callable[[], None]] = []
        self._steps0 = 0
        self.kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])  # [steps, seconds]
        #: Per kind of a step's forward (`none`: no forward): [steps, host seconds].
        self.host_kinds: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
        self._step_kind = "none"  # the kind of the running step's forward

    def __enter__(self) -> HostProfile:
        e = self.engine
        relay = e.plugins.hook
        for hook in ("schedule", "allocate_kv", "sample"):
            self._wrap(relay, hook, hook)
        self._wrap(e.runner, "prepare", "prepare")
        self._wrap(e.runner, "forward", "forward (launch)")
        self._wrap_forward_kinds(e.runner)
        self._wrap_forward_parts(e.runner)
        self._wrap_sample_parts(e)
        self._wrap(e, "_resolve", "resolve (all)")
        self._wrap(e, "_export", "export_metrics")
        self._wrap(e, "_admit", "admit")
        self._wrap(e, "_step_snapshot", "step snapshot")
        self._wrap(e.detokenizer, "submit", "detokenize")
        self._wrap(e.detokenizer, "take", TAKE)
        self._wrap(e, "_apply_inbox", "inbox")
        self._wrap(e.kv, "commit", "kv commit")
        self._wrap(e, "step", TOTAL)
        if e.speculation.speculator is not None:
            self._wrap(e.speculation, "propose", "speculation: propose")
            self._wrap(e.speculation, "mark_rows", "speculation: mark_rows")
            self._wrap(e, "_verify", "speculation: verify")
            self._wrap(e.speculation, "read_tokens", SPEC_WAIT)
        self._wrap_step_kinds(e)
        self._wrap(PendingStep, "take", WAIT)
        self._steps0 = e.num_steps
        return self

    def __exit__(self, *exc: object) -> None:
        while self._restore:
            self._restore.pop()()

    def _wrap_forward_parts(self, runner) -> None:
        """Time the parts of `ModelRunner.forward` that exist now (a swap mid-run builds a new
        backend or graph runner: its parts then count only in the whole)."""
        if runner.attention is not None:
            self._wrap(runner.attention, "prepare", "forward: attention.prepare")
        if runner.cuda_graphs is not None:
            self._wrap(runner.cuda_graphs, "replay", "forward: graph replay")
        if getattr(runner, "mixed_graphs", None) is not None:
            self._wrap(runner.mixed_graphs, "replay", "forward: mixed graph replay")
        if hasattr(runner.model, "compute_logits"):
            self._wrap(runner.model, "compute_logits", "forward: compute_logits")
        if getattr(runner, "tp", None) is not None:  # rank 0's messages to the followers
            self._wrap(runner.tp, "share_batch", "forward: tp share batch")
            self._wrap(runner.tp.groups, "broadcast_objects", "forward: tp plan message")
            self._wrap(runner.tp.groups, "broadcast_tensor", "forward: tp batch tensors")

    def _wrap_sample_parts(self, engine) -> None:
        """Time the parts of `sample` that exist: the standard sampler's, the Gumbel module's
        launch (looked up at call time), the core's output check."""
        import sys

        from pegboard.core import contract

        sampler = engine.plugins.active("sampler")
        for attr, name in (("_batch_facts", "batch facts"), ("_gumbel", "gumbel"),
                           ("_seed_state", "seed state"),
                           ("_draw_seeds", "seeds")):  # (an older tree's, in an A/B)  # fmt: skip
            if callable(getattr(sampler, attr, None)):
                self._wrap(sampler, attr, f"sample: {name}")
        gumbel = sys.modules.get("pegboard.plugins.sampling.gumbel")
        if gumbel is not None:
            self._wrap(gumbel, "_launch", "sample: kernel launch")
        self._wrap(contract, "check_sample", "sample: check")

    def _wrap_forward_kinds(self, runner) -> None:
        """Count and time `forward` per step kind (`step_kind`)."""
        forward, kinds, clock = runner.forward, self.kinds, self.clock

        def timed(batch, *args, **kwargs):
            start = clock()
            try:
                return forward(batch, *args, **kwargs)
            finally:
                verify = batch.logits_rows is not None  # speculation: drafts verified
                self._step_kind = "verify" if verify else step_kind(batch.query_lens_cpu)
                kind = kinds[self._step_kind]
                kind[0] += 1
                kind[1] += clock() - start

        runner.forward = timed
        self._restore.append(lambda: setattr(runner, "forward", forward))

    def _wrap_step_kinds(self, engine) -> None:
        """Count each step's host work (its time less its wait for tokens) by its forward's
        kind (`host_ms_by_kind`)."""
        step, seconds, clock, kinds = engine.step, self.seconds, self.clock, self.host_kinds

        def timed(*args, **kwargs):
            self._step_kind, waited, start = "none", _waits(seconds), clock()
            try:
                return step(*args, **kwargs)
            finally:
                kind = kinds[self._step_kind]
                kind[0] += 1
                kind[1] += clock() - start - (_waits(seconds) - waited)

        engine.step = timed
        self._restore.append(lambda: setattr(engine, "step", step))

    def _wrap(self, owner, attr: str, name: str) -> None:
        fn = getattr(owner, attr)
        seconds, clock = self.seconds, self.clock

        def timed(*args, **kwargs):
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                seconds[name] += clock() - start

        own = attr in vars(owner)  # else a method: the class's shows through again
        setattr(owner, attr, timed)
        self._restore.append(
            (lambda: setattr(owner, attr, fn)) if own else (lambda: delattr(owner, attr))
        )

    def report(self) -> dict:
        """ms per step of each phase, largest first, and the host work per step."""
        steps = max(self.engine.num_steps - self._steps0, 1)
        per_step = {k: v / steps * 1e3 for k, v in self.seconds.items()}
        rows = dict(sorted(per_step.items(), key=lambda kv: -kv[1]))
        total, wait = (
            per_step.get(TOTAL, 0.0),
            per_step.get(WAIT, 0.0) + per_step.get(SPEC_WAIT, 0.0),
        )
        return {
            "steps": steps,
            "host_ms_per_step": round(total - wait + per_step.get(TAKE, 0.0), 3),
            "device_wait_ms_per_step": round(wait, 3),
            "ms_per_step": {k: round(v, 3) for k, v in rows.items()},
            "forward_by_kind": {
                k: {"steps": n, "forward_ms_per_step": round(t / n * 1e3, 3)}
                for k, (n, t) in sorted(self.kinds.items())
            },
            "host_ms_by_kind": {
                k: {"steps": n, "host_ms_per_step": round(t / n * 1e3, 3)}
                for k, (n, t) in sorted(self.host_kinds.items())
            },
        }


def _waits(seconds: dict[str, float]) -> float:
    return seconds.get(WAIT, 0.0) + seconds.get(SPEC_WAIT, 0.0)


def step_kind(query_lens: list[int]) -> str:
    """`decode` (every request one new token), `mixed` (some one, some more) or `prefill`."""
    ones = query_lens.count(1)
    return "decode" if ones == len(query_lens) else "mixed" if ones else "prefill"
