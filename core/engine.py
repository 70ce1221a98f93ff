"""The engine: request queues and the step loop, as a sequence of hook calls (DESIGN.md §5).

    schedule -> allocate_kv -> model forward (attention backend from attention_kernel)
    -> sample -> detokenize / stop -> export_metrics

Everything a step does that is not a hook call is a small private method below `step`.
The engine is single-threaded: `add_request`, `abort` and `swap` may be called from other
threads, but they only queue work that `step` applies at its next boundary.
"""

from __future__ import annotations

import gc
import itertools
import logging
import operator
import threading
import time
from collections import deque
from concurrent.futures import Future
from pathlib import Path

import torch
from pegboard.core.config import EngineConfig
from pegboard.core.context_fit import fit_context_to_kv
from pegboard.core.contract import CheckedPlan, PluginFault, PluginGuard
from pegboard.core.cuda_graph_mixed import mixed_graph_max_tokens
from pegboard.core.detokenizer_process import (
    detokenizer_place,
    spawn_detokenizer,
    start_detokenizer,
)
from pegboard.core.disaggregation import start_disaggregation
from pegboard.core.distributed import start_tensor_parallel
from pegboard.core.heap_freeze import freeze_heap, unfreeze_heap
from pegboard.core.model_runner import ModelRunner
from pegboard.core.models.errors import ModelLoadError
from pegboard.core.models.loader import resolve_device
from pegboard.core.models.quantization import check_kv_dtype, select_linear
from pegboard.core.moe.runtime import ExpertRuntime
from pegboard.core.outputs import RequestOutput, first_stop
from pegboard.core.overlap import PENDING_TOKEN, PendingStep
from pegboard.core.patches import apply_patches
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative import Speculation, check_speculator
from pegboard.core.swap import PendingSwap, SwapError, SwapResult
from pegboard.core.tokenizer import load_tokenizer
from pegboard.sdk.device import to_device
from pegboard.sdk.slots import SLOTS, KVCache, Plugin, PluginContext
from pegboard.sdk.types import (
    FinishReason,
    KVPool,
    MetricsSnapshot,
    Request,
    RequestStatus,
    StepBudget,
)

log = logging.getLogger("pegboard.engine")


#: Added to the measured activation peak when sizing the KV pool: the attention backend's
#: metadata and workspaces (created after the pool) and allocator rounding. The first H100 run
#: of tests/test_gpu_memory.py overshot a pool sized without it by 69 MB.
ACTIVATION_ALLOWANCE = 256 << 20

#: Hot loops compare a request's status directly (the `finished` property costs a call).
_FINISHED = RequestStatus.FINISHED
_status = operator.attrgetter("status")
_NONE = (None,)  # one token's logprobs when none were asked for (`_append`)
_RUNNING = RequestStatus.RUNNING

#: The attention backend a CUDA engine uses when none is selected.
GPU_DEFAULT_ATTENTION = "triton"


class KVMemoryError(RuntimeError):
    """The device has no memory left for the KV cache after the weights and activations."""


class RequestRejected(ValueError):
    """A request the engine cannot serve (too long, empty, bad token ids); nothing was queued."""


class Engine:
    """Owns the model runner, the plugin selection and the request queues; `step()` runs one
    engine step and returns the per-request deltas it produced."""

    def __init__(self, config: EngineConfig, plugins: PluginManager | None = None) -> None:
        from pegboard.core.default_model import default_model_dir

        self.config = config
        self.plugins = plugins or PluginManager()
        self.guard = PluginGuard(self.plugins)  # checks plugins' results, counts their errors
        self.patches = apply_patches(config.patches, strict=config.strict_patches)
        self._check_selections()  # a typo in a plugin name fails before the model loads
        self.model_dir = Path(config.model) if config.model else default_model_dir()
        check_speculator(self.plugins, config, self.model_dir)  # a mismatched draft: before loading
        self.tp = start_tensor_parallel(config)  # None for one rank, else spawns the others
        device = resolve_device(self.tp.device if self.tp else config.device)
        detokenizer_at = detokenizer_place(config.detokenizer, device)
        dummy = config.load_format == "dummy"  # a missing tokenizer: token ids as text
        # A detokenizer process loads its tokenizer while the model loads.
        started = spawn_detokenizer(detokenizer_at, self.model_dir, dummy, self._stop_request)
        linear = select_linear(self.plugins, config, self.model_dir)  # builds the projections
        self.runner = ModelRunner(
            self.model_dir,
            config.dtype,
            device,
            config.max_model_len,
            load_format=config.load_format,
            fused_kernels=not config.disable_fused_kernels,
            tp=self.tp,
            linear=linear,
        )
        self.tokenizer = load_tokenizer(self.model_dir, allow_missing=config.load_format == "dummy")
        self.info = self.runner.info
        self.ctx = PluginContext(self.info, self.runner.device, self._engine_facts())
        for slot in SLOTS:
            self._select(slot)
        self.moe = ExpertRuntime.create(self, self.runner.model)  # MoE placement (core/moe)
        self.speculation = Speculation(self)  # drafts, verify, rollback (core/speculative)
        self._bind_attention()  # after Speculation: its verify lengths and hooks get graphs
        self._warm_sampler()
        fit_context_to_kv(self.info, self.kv, config.max_model_len)  # core/context_fit.py
        self.budget = StepBudget(
            max_batched_tokens=config.max_num_batched_tokens,
            max_running_requests=config.max_running_requests,
            max_model_len=self.info.max_model_len,
        )
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self._inbox: deque[Request] = deque()
        self._aborts: deque[str] = deque()
        self._stops: deque[tuple[Request, int | None, str | None]] = deque()  # from detokenizer
        self._swaps: list[PendingSwap] = []
        self._outbox: list[RequestOutput] = []
        self._pending: PendingStep | None = None  # the step whose tokens are still on the device
        self._lock = threading.Lock()
        self.num_steps = 0
        self._num_finished = 0  # `_finish` calls: `_run` scans its batch for them only after one
        #: Text, stop strings and streaming, off the step loop: it reads `step()`'s deltas.
        self.detokenizer = start_detokenizer(
            detokenizer_at, self.tokenizer, self.model_dir, dummy, self._stop_request, started
        )
        self.pd = start_disaggregation(self)  # prefill or decode half of a PD pair, or None
        # Start-up is over (weights, KV pool, CUDA graphs): its objects leave the collector's
        # reach, so no full collection walks them inside the step loop (core/heap_freeze.py).
        frozen = freeze_heap(config.gc_freeze)
        log.debug("garbage collector: %d start-up objects frozen", frozen)

    @property
    def hook(self):
        return self.plugins.hook

    @property
    def kv(self) -> KVCache:
        return self.plugins.active("kv_cache")

    # ---------------------------------------------------------------- the step loop

    def step(self) -> list[RequestOutput]:
        """One step (`_step`) with this engine's GPU as the thread's current CUDA device."""
        with self.runner.on_device():
            return self._step()

    def _step(self) -> list[RequestOutput]:
        """Run one engine step: admit queued work, schedule, allocate, forward, sample, stop.

        With overlap scheduling (`pegboard.core.overlap`) this step's tokens are read in the
        next step, so the host prepares step N+1 while the device computes step N. Returns the
        token-level deltas (no text), which also go to `self.detokenizer`: text, stop strings
        and streaming happen there (`pegboard.core.detokenizer_thread`)."""
        start = time.perf_counter()
        self._apply_inbox()
        if self.pd is not None:
            self.pd.step()  # PD: pair requests, move KV, hand received requests to `running`
        self._apply_swaps()
        checked = self._schedule()
        plan = checked.plan if checked else None
        if plan:
            self._preempt(plan.preempted)
            scheduled, num_tokens = self._unfinished(checked)
            with self.runner.host_threads(num_tokens):  # CPU: no threads for tiny work
                self._call_plugin(scheduled, lambda: self._run(scheduled, num_tokens))
        if self.config.disable_overlap or not plan or self.speculation.needs_tokens():
            self._resolve()  # (a step that may draft needs its requests' last tokens)
        outputs, self._outbox = self._outbox, []
        self.detokenizer.submit(outputs)
        self.num_steps += 1
        if self.moe is not None:
            self.moe.step_boundary()  # record expert load; rebalance every N steps
        self._export(self._step_snapshot(checked, time.perf_counter() - start))
        return outputs

    def _unfinished(self, checked: CheckedPlan) -> tuple[list[Request], list[int]]:
        """The plan's requests and token counts, less those a preemption's resolve finished."""
        requests, num_tokens = checked.requests, checked.num_tokens
        if not checked.plan.preempted:  # nothing was resolved since the plan was checked
            return requests, num_tokens
        keep = [i for i, r in enumerate(requests) if r.status is not _FINISHED]
        return [requests[i] for i in keep], [num_tokens[i] for i in keep]

    def _run(self, scheduled: list[Request], num_tokens: list[int]) -> None:
        finished = self._num_finished  # none of `scheduled` is finished yet
        num_tokens = self.speculation.propose(scheduled, num_tokens, self.budget)  # + drafts
        failed = self.guard.call(
            "kv_cache", self.hook.allocate_kv, scheduled=scheduled, num_tokens=num_tokens
        )
        self.speculation.withdraw(failed or [])
        scheduled, num_tokens = self._admit(scheduled, num_tokens, failed or [])
        if not scheduled:
            self._resolve()
            return
        batch = self.runner.prepare(scheduled, num_tokens, self.kv.page_size, self._pending)
        self.speculation.mark_rows(batch)  # drafting requests: logits at every draft
        logits = self.runner.forward(batch)  # launched; the device computes while we go on
        for r, n in zip(scheduled, num_tokens):
            r.num_computed_tokens += n
        self._resolve()  # the previous step's tokens: append, stop, release
        samples = batch.samples
        sampling = scheduled if all(samples) else [r for r, s in zip(scheduled, samples) if s]
        if self._num_finished != finished and _FINISHED in map(_status, sampling):
            keep = [i for i, r in enumerate(sampling) if r.status is not _FINISHED]  # by its token
            logits = logits[to_device(keep, logits.device, torch.int64)]
            sampling = [sampling[i] for i in keep]
        if sampling and self.speculation.drafting:
            self._verify(logits, sampling)
        elif sampling:
            try:
                sampled = self.guard.sample(
                    self.hook.sample, logits, sampling, self.info.vocab_size
                )
                self._pending = PendingStep(sampling, sampled, self.info.vocab_size)
            except PluginFault as fault:  # fails the requests of this `sample` call only
                self._fail(sampling, fault)
        if self._num_finished != finished:
            scheduled = [r for r in scheduled if r.status is not _FINISHED]
        self.kv.commit(list(scheduled))

    def _verify(self, logits: torch.Tensor, requests: list[Request]) -> None:
        """Speculative decoding: append each request's accepted drafts and the target's next
        token (`pegboard.core.speculative`; it has rolled the rejected drafts back)."""
        try:
            verified = self.speculation.verify(logits, requests)
        except PluginFault as fault:  # the sampler, for requests without drafts
            return self._fail(requests, fault)
        for r, tokens, logprobs in verified:
            if self._append(r, tokens, logprobs, merge=True):  # one delta per request
                # the tokens after a stop were computed: forget their KV
                r.num_computed_tokens = min(r.num_computed_tokens, r.num_tokens)
                self._release(r)

    def _resolve(self) -> None:
        """Read the in-flight step's sampled tokens and apply them: append each to its
        request (replacing `PENDING_TOKEN`), check token-level stops, release finished ones."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        ids = pending.take()
        if pending.on_device:  # ids from a device tensor: range-checked now, on the host
            try:
                self.guard.sampled_ids(pending.host_array, self.info.vocab_size)
            except PluginFault as fault:
                return self._fail(pending.requests, fault)
        append = self._append_sampled
        for r, token, lp in zip(pending.requests, ids, pending.logprobs):
            if r.status is _FINISHED:  # failed meanwhile (`_release` dropped its placeholder)
                continue
            if append(r, token, lp):
                self._release(r)

    # ---------------------------------------------------------------- requests in and out

    def add_request(self, request: Request) -> None:
        """Queue a request (thread-safe). Raises `RequestRejected` if it can never be served."""
        self.validate(request)
        request.eos_token_ids = request.eos_token_ids or self.tokenizer.eos_token_ids
        with self._lock:
            if request.request_id in self.requests or any(
                r.request_id == request.request_id for r in self._inbox
            ):
                raise RequestRejected(f"request id {request.request_id!r} is already in use")
            self._inbox.append(request)

    def validate(self, request: Request) -> None:
        n, max_len = request.num_prompt_tokens, self.info.max_model_len
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if n >= max_len:
            raise RequestRejected(
                f"the prompt is {n} tokens, but the model's context length is {max_len} "
                "(at least one token must be generated)"
            )
        bad = [t for t in request.prompt_token_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise RequestRejected(
                f"prompt token ids out of the vocabulary [0, {self.info.vocab_size}): {bad[:5]}"
            )
        capacity = self.kv.num_pages * self.kv.page_size
        if n + 1 > capacity:
            raise RequestRejected(
                f"the prompt is {n} tokens, but the KV cache holds only {capacity} tokens"
            )

    def abort(self, request_id: str) -> None:
        """Cancel a request (thread-safe); its KV is freed at the next step boundary."""
        with self._lock:
            self._aborts.append(request_id)

    def has_work(self) -> bool:
        return bool(
            self.waiting
            or self.running
            or self._inbox
            or self._aborts
            or self._stops
            or self._outbox
            or self._swaps
            or self._pending is not None
            or (self.pd is not None and self.pd.has_work())
        )

    def _apply_inbox(self) -> None:
        with self._lock:
            new, self._inbox = list(self._inbox), deque()
            aborts, self._aborts = list(self._aborts), deque()
            stops, self._stops = list(self._stops), deque()
        if aborts or stops:
            self._resolve()  # an aborted request releases its KV: its tokens must be real
        for r in new:
            self.requests[r.request_id] = r
            self.guard.sampling.add(r)  # its sampling parameters, for every `sample` call
            if self.pd is None or not self.pd.take(r):  # a decode engine waits for the KV
                self.waiting.append(r)
        for r, num_output_tokens, error in stops:
            self._apply_stop(r, num_output_tokens, error)
        for request_id in aborts:
            r = self.requests.get(request_id)
            if r is not None and not r.finished:
                self._finish(r, FinishReason.ABORT)
                self._release(r)

    def _admissible(self) -> list[Request]:
        # A pending swap of a plugin that must drain stops admissions until running is empty.
        if any(self.plugins.active(p.slot).handoff == "drain" for p in self._swaps):
            return []
        return list(self.waiting)

    def _preempt(self, preempted: list[Request]) -> None:
        if preempted:
            self._resolve()  # a preempted request is recomputed from its token ids
        capacity = self.kv.num_pages * self.kv.page_size
        for r in reversed(preempted):
            if r.finished:  # finished by the step just resolved
                continue
            self.kv.free(r)
            self.running.remove(r)
            if r.num_tokens + 1 > capacity:  # could never fit again: stop instead of looping
                self._finish(r, FinishReason.LENGTH)
                self._release(r)
                continue
            r.num_computed_tokens = 0
            r.status = RequestStatus.WAITING
            r.num_preemptions += 1
            self.waiting.appendleft(r)

    def _admit(
        self, scheduled: list[Request], num_tokens: list[int], failed: list[Request]
    ) -> tuple[list[Request], list[int]]:
        """Move newly scheduled requests to running; requests the cache could not serve go back
        to waiting (running ones are preempted)."""
        if not failed and scheduled and self._all_running(scheduled):  # a decode step
            return scheduled, num_tokens
        failed_ids = {id(r) for r in failed}
        if failed:
            self._preempt([r for r in failed if r.status is RequestStatus.RUNNING])
        kept, kept_n, admitted = [], [], []
        now = time.monotonic()
        for r, n in zip(scheduled, num_tokens):
            if r.status is _FINISHED or id(r) in failed_ids:  # finished: by a resolved step
                continue
            if r.status is RequestStatus.WAITING:
                admitted.append(r)
                self.running.append(r)
                r.status = RequestStatus.RUNNING
                r.first_scheduled_time = r.first_scheduled_time or now
            kept.append(r)
            kept_n.append(n)
        self._dequeue(admitted)
        return kept, kept_n

    def _all_running(self, scheduled: list[Request]) -> bool:
        """Whether every request of `scheduled` is running: the running queue itself (which
        holds only running requests) in one list comparison, else counted in C (a set would
        hash each enum)."""
        if scheduled == self.running:
            return True
        return list(map(_status, scheduled)).count(_RUNNING) == len(scheduled)

    def _dequeue(self, admitted: list[Request]) -> None:
        """Take the admitted requests out of the waiting queue in one pass (a `remove` each
        would scan the queue once per request)."""
        waiting = self.waiting
        k = len(admitted)
        if k <= len(waiting) and all(map(operator.is_, admitted, itertools.islice(waiting, k))):
            for _ in range(k):  # the head of the queue, in order: the common case
                waiting.popleft()
        elif admitted:
            gone = set(map(id, admitted))
            rest = [r for r in waiting if id(r) not in gone]
            waiting.clear()
            waiting.extend(rest)

    def _append(self, r: Request, tokens, logprobs, merge: bool = False) -> bool:
        """Append output `tokens` to `r`: a step's sampled token, or a verify step's accepted
        drafts and the target's token; `logprobs` has one entry per token (None where none
        were asked for). They go into this step's delta of `r`: a new one, or with `merge`
        the last one if it is `r`'s (one delta per request and step). The tokens after the
        first that stops `r` (EOS, a stop token, a length limit: `first_stop`; stop strings
        are the detokenizer's) are dropped and `r` finishes: returns whether it did."""
        stop = first_stop(r, tokens, self.budget.max_model_len)
        if stop is not None:
            tokens, logprobs = tokens[: stop[0] + 1], logprobs[: stop[0] + 1]
        lps = [lp for lp in logprobs if lp is not None] if _NONE != logprobs else []
        r.extend_tokens(tokens, lps)
        if r.first_token_time is None:
            r.first_token_time = time.monotonic()
        last = self._outbox[-1] if merge and self._outbox else None
        if last is not None and last.request is r and not last.finished:
            last.new_token_ids += tokens
            last.new_logprobs += lps
        else:
            self._outbox.append(
                RequestOutput(r.request_id, list(tokens), "", lps, False, None, None, r)
            )
        if stop is None:
            return False
        self._finish(r, stop[1])
        return True

    def _append_sampled(self, r: Request, token: int, lp) -> bool:
        """`_append(r, (token,), (lp,))` for a step's one sampled token, which replaces `r`'s
        `PENDING_TOKEN`: the same delta and stop (`first_stop` for one token), inlined because
        it runs for every request of every step."""
        params, token_ids, output = r.params, r.token_ids, r.output_token_ids
        token_ids[-1] = token
        output.append(token)
        if lp is None:
            lps = []
        else:
            lps = [lp]
            r.output_logprobs.append(lp)
        if r.first_token_time is None:
            r.first_token_time = time.monotonic()
        self._outbox.append(RequestOutput(r.request_id, [token], "", lps, False, None, None, r))
        if (token in r.eos_token_ids and not params.ignore_eos) or token in params.stop_token_ids:
            self._finish(r, FinishReason.STOP)
        elif len(output) >= params.max_tokens or len(token_ids) >= self.budget.max_model_len:
            self._finish(r, FinishReason.LENGTH)
        else:
            return False
        return True

    def _stop_request(self, r: Request, num_output_tokens: int | None, error=None) -> None:
        """The detokenizer thread found a stop string ending at output token
        `num_output_tokens` (or failed: `error`); applied at the next step boundary."""
        with self._lock:
            self._stops.append((r, num_output_tokens, error))

    def _apply_stop(self, r: Request, num_output_tokens: int | None, error: str | None) -> None:
        """Cut the output back to where the stop string ended (the request ran on for a step
        or two meanwhile) and finish the request with `stop` (`error`: with `error`)."""
        extra = r.num_output_tokens - (num_output_tokens or r.num_output_tokens)
        if extra > 0:
            del r.token_ids[-extra:], r.output_token_ids[-extra:]
            del r.output_logprobs[num_output_tokens:]
            r.num_computed_tokens = min(r.num_computed_tokens, r.num_tokens)
        reason = FinishReason.STOP if error is None else FinishReason.ERROR
        if r.finished:  # already ended by a later token (EOS, length) and released
            r.finish_reason, r.error = reason, error
            return
        self._finish(r, reason, error)
        self._release(r)

    def _finish(self, r: Request, reason: FinishReason, error: str | None = None) -> None:
        r.status = RequestStatus.FINISHED
        self._num_finished += 1
        r.finish_reason = reason
        r.error = error
        r.finished_time = time.monotonic()
        last = self._outbox[-1] if self._outbox and self._outbox[-1].request is r else None
        if last is None:
            last = RequestOutput(r.request_id, request=r)
            self._outbox.append(last)
        last.finished, last.finish_reason, last.error = True, reason, error

    def _release(self, r: Request) -> None:
        """Forget a finished request: free its KV, drop it from the queues, report it."""
        if r.token_ids and r.token_ids[-1] == PENDING_TOKEN:  # failed mid-step: a cache must
            r.token_ids.pop()  # never keep a placeholder as if it were a token
            r.num_computed_tokens = min(r.num_computed_tokens, len(r.token_ids))
        if self.pd is None or not self.pd.defer_free(r):  # PD: pages a transfer still uses
            self.kv.free(r)
        self.runner.page_tables.forget(r)
        self.guard.sampling.remove(r)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        self.requests.pop(r.request_id, None)
        self._export(MetricsSnapshot(kind="request", timestamp=time.time(), request=r))

    def _schedule(self) -> CheckedPlan | None:
        """The scheduler's plan, checked (`pegboard.core.contract`). A failing scheduler fails
        no request at first; after `SCHEDULER_FAILURE_LIMIT` failing steps in a row it fails
        the queued ones (see the `schedule` hookspec)."""
        try:
            return self.guard.schedule(
                self.hook.schedule, self._admissible(), self.running, self.budget, self.kv
            )
        except PluginFault as fault:
            if not self.guard.scheduler_stuck:
                log.error("%s; no request is scheduled in this step", fault)
                return None
            steps, self.guard.scheduler_failures = self.guard.scheduler_failures, 0
            self._fail(self.running + list(self.waiting), f"{fault} ({steps} steps in a row)")
            return None

    def _call_plugin(self, affected: list[Request], fn):
        """Run `fn`; if it raises, fail the affected requests (not the engine), naming the
        plugin at fault, or the model forward (with its attention backend) otherwise."""
        try:
            return fn()
        except PluginFault as fault:
            self._fail(affected, fault)
        except Exception as e:
            backend = self.plugins.describe(self.plugins.active("attention"))
            log.exception("model forward (%s) raised", backend)
            fault = f"model forward ({backend}) failed: {type(e).__name__}: {e}"
            self._fail(affected, fault)
        return None

    def _fail(self, affected: list[Request], fault: PluginFault | str) -> None:
        """Finish the unfinished `affected` requests with the error `fault`."""
        message = str(fault)
        log.error("%s; failing %d request(s)", message, len(affected))
        for r in affected:
            if not r.finished:
                self._finish(r, FinishReason.ERROR, message)
                self._release(r)

    # ---------------------------------------------------------------- plugins

    def _engine_facts(self) -> dict:
        c = self.config
        return {
            "page_size": c.page_size,
            "kv_cache_tokens": c.kv_cache_tokens,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "kv_memory_bytes": self._kv_memory_bytes(),
            "max_model_len": self.info.max_model_len,
            "max_running_requests": c.max_running_requests,
            "cuda_graph_max_bs": c.graph_max_bs,
            "schedule_conservativeness": c.schedule_conservativeness,
            "seed": c.seed,
            "load_format": c.load_format,  # a draft model of a random-weight target: random too
            "kv_cache_dtype": c.kv_cache_dtype,
            "kv_cache_layout": c.value_layout(
                self._on_cuda(), c.attention or self._default("attention")
            ),
            "model_name": c.model or self.model_dir.name,  # as `serve` names it by default
        }

    def _kv_memory_bytes(self) -> int:
        """Device memory for the KV pool: what is free after the weights, less one step's
        activation peak (measured by a profile run) and the `1 - gpu_memory_utilization`
        share of the device kept for CUDA graphs, kernels' workspaces and other processes."""
        c = self.config
        if self.runner.device.type != "cuda":
            return c.cpu_kv_cache_bytes
        if c.kv_cache_tokens is not None:
            return 0  # sized by tokens: no profile run needed
        gc.unfreeze()  # an earlier engine of this process that is unreachable (frozen by its
        gc.collect()  # start-up, core/heap_freeze.py) frees its pool now
        activations = ACTIVATION_ALLOWANCE + self.runner.profile_activation_bytes(
            c.max_num_batched_tokens, c.max_running_requests
        )
        free, total = torch.cuda.mem_get_info(self.runner.device)
        reserve = total * (1.0 - c.gpu_memory_utilization)
        kv = int(free - reserve - activations)
        if kv <= 0:
            raise KVMemoryError(
                f"no device memory is left for the KV cache: {free / 2**30:.2f} GiB free after "
                f"the weights, {activations / 2**30:.2f} GiB for one step's activations "
                f"(--max-num-batched-tokens {c.max_num_batched_tokens}), {reserve / 2**30:.2f} "
                f"GiB kept back (--gpu-memory-utilization {c.gpu_memory_utilization}); raise "
                "the utilisation, lower the step budget, or free the device"
            )
        log.info(
            "KV cache memory: %.2f GiB (free %.2f GiB, activation peak %.2f GiB, reserve %.2f GiB)",
            kv / 2**30,
            free / 2**30,
            activations / 2**30,
            reserve / 2**30,
        )
        return kv

    def _selected(self, slot: str) -> list[str]:
        if SLOTS[slot].process != "engine":  # e.g. `router`: the router process selects it
            return []
        chosen = self.config.selection(slot) or self._default(slot)
        return chosen if isinstance(chosen, list) else [chosen] if chosen else []

    def _default(self, slot: str) -> str | None:
        """The slot's default plugin; for attention on a CUDA device, the fast `triton`
        backend rather than the reference `torch` one (as vLLM and SGLang pick theirs)."""
        if slot == "attention" and self._on_cuda():
            return GPU_DEFAULT_ATTENTION
        return SLOTS[slot].default

    def _on_cuda(self) -> bool:
        try:
            return resolve_device(self.config.device).type == "cuda"
        except ModelLoadError:  # reported by the model runner, after the plugin checks
            return False

    def _check_selections(self) -> None:
        for slot in SLOTS:
            for name in self._selected(slot):
                self.plugins.validate_options(slot, name, self.config.plugin_options.get(name))

    def _select(self, slot: str) -> None:
        for name in self._selected(slot):
            plugin = self.plugins.create(slot, name, self.config.plugin_options.get(name))
            plugin.setup(self.ctx)
            self.plugins.register(plugin)

    def _warm_sampler(self) -> None:
        """The sampler's `warm_up` for the logits `sample` will receive (the model's dtype for
        a sampler that takes it, else float32): its kernels compile now, not in a step."""
        sampler = self.plugins.active("sampler")
        warm_up = getattr(sampler, "warm_up", None)
        if warm_up is not None:
            model_dtype = getattr(sampler, "logits_in_model_dtype", False)
            try:
                with torch.inference_mode():
                    warm_up(
                        self.info.vocab_size,
                        self.info.dtype if model_dtype else torch.float32,
                        self.runner.device,
                    )
            except Exception as e:  # a guest's optimisation: its kernels compile at first use
                log.error("%s: warm_up failed (%s: %s); serving without it",
                          self.plugins.describe(sampler), type(e).__name__, e)  # fmt: skip

    def _bind_attention(self) -> None:
        pool: KVPool = self.kv.pool
        backend = self.hook.attention_kernel(model=self.info, pool=pool)
        if backend is None:
            raise SwapError("the attention plugin returned no backend")
        attention = self.plugins.active("attention").name
        check_kv_dtype(backend, pool, attention, self.runner.model, self.config.kv_cache_scales)
        if self.tp is not None:  # every rank builds its backend over its own pool of local heads
            self.tp.bind(self.plugins.active("attention"), pool, self.ctx.engine)
        c = self.config
        self.runner.set_attention(  # (re)captures decode CUDA graphs for this backend and pool
            backend,
            cuda_graph_max_bs=c.graph_max_bs,
            max_requests=c.max_running_requests,
            mixed_max_tokens=mixed_graph_max_tokens(c),
        )

    def swap(self, slot: str, name: str, **options) -> Future:
        """Replace the plugin in `slot` by `name` at the next step boundary.

        The name and options are checked now (raising `PluginError`); the returned future
        resolves to a `SwapResult` once applied, or to a `SwapError` if the new plugin's setup
        failed — then the previous plugin keeps serving."""
        spec = SLOTS.get(slot)
        if spec is None:
            raise SwapError(f"unknown slot {slot!r}; slots: {', '.join(SLOTS)}")
        if spec.multi:
            raise SwapError(f"slot {slot!r} holds several plugins at once; it cannot be swapped")
        if self.plugins.active(slot) is None:
            raise SwapError(f"slot {slot!r} has no active plugin to swap")
        pending = PendingSwap(slot, self.plugins.create(slot, name, options))
        with self._lock:
            self._swaps.append(pending)
        return pending.future

    def _apply_swaps(self) -> None:
        with self._lock:
            swaps = list(self._swaps)
        applied = False
        if swaps:
            self._resolve()  # the new plugin takes over complete requests
        for p in swaps:
            old = self.plugins.active(p.slot)
            drain = old.handoff == "drain"
            if drain and self.running:
                continue  # admissions are paused until the running requests finish
            with self._lock:
                self._swaps.remove(p)
            # old graphs (and pools) in cycles go before the new plugin captures its own
            unfreeze_heap(self.config.gc_freeze)
            applied = True
            try:
                self._replace(p.slot, old, p.plugin, drain)
            except Exception as e:
                log.warning("swap of %s to %s failed: %s", p.slot, p.plugin.name, e)
                p.future.set_exception(
                    SwapError(
                        f"swapping {p.slot} to {p.plugin.name!r} failed, "
                        f"{old.name!r} stays active: {type(e).__name__}: {e}"
                    )
                )
            else:
                result = SwapResult(p.slot, old.name, p.plugin.name, drain, self.num_steps)
                log.info("%s", result)
                p.future.set_result(result)
        if applied:
            old = None  # this frame's last reference to a swapped-out plugin
            freeze_heap(self.config.gc_freeze)  # the new plugin's start-up (one full collection)

    def _replace(self, slot: str, old: Plugin, new: Plugin, drained: bool) -> None:
        new.setup(self.ctx, previous=None if drained else old)
        self.plugins.unregister(old)
        self.plugins.register(new)
        if slot == "sampler":
            self._warm_sampler()
        if slot in ("attention", "kv_cache"):
            try:
                self._bind_attention()
            except Exception:
                self.plugins.unregister(new)
                self.plugins.register(old)
                raise
        old.close()

    # ---------------------------------------------------------------- metrics

    def _step_snapshot(self, checked: CheckedPlan | None, elapsed: float) -> MetricsSnapshot:
        plan = checked.plan if checked else None
        tokens = checked.num_tokens if plan else []  # the plan's, each >= 1 (checked)
        num_decode = tokens.count(1)
        stats = self.kv.stats()
        return MetricsSnapshot(
            kind="step",
            timestamp=time.time(),
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            batch_size=len(tokens),
            num_prefill_tokens=sum(tokens) - num_decode,
            num_decode_tokens=num_decode,
            num_preempted=len(plan.preempted) if plan else 0,
            kv_usage=self.kv.usage(),
            step_time_s=elapsed,
            prefix_hit_tokens=int(stats.get("prefix_hit_tokens", 0)),
            prefix_query_tokens=int(stats.get("prefix_query_tokens", 0)),
            plugin_errors=self.guard.errors,
            extra=(self.moe.metrics() if self.moe is not None else {})  # MoE: balancedness
            | self.speculation.metrics(),  # the speculation switch's decisions
        )

    def _export(self, snapshot: MetricsSnapshot) -> None:
        self.guard.export(self.hook.export_metrics.get_hookimpls(), snapshot)

    def close(self) -> None:
        for slot in SLOTS:
            for plugin in list(self.plugins.active_all(slot)):
                self.plugins.unregister(plugin)
                plugin.close()
        self.patches.unapply()
        self.detokenizer.close()
        if self.pd is not None:
            self.pd.close()
        if self.tp is not None:
            self.runner.release_graphs()  # before NCCL's teardown, which waits for them
            self.tp.close()
        unfreeze_heap(self.config.gc_freeze)  # this engine's cycles are collectable again
