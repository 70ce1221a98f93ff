"""The engine's side of speculative decoding: draft limits, the verify forward's rows,
verification and the rollback of rejected tokens.

One step with a speculator (`Engine._run`):

    propose  -> (unless the switch says no: `switch.py`) drafts appended to each decoding
                request's `token_ids` (drafts still on the device, `Drafts.on_device`, as
                `DEVICE_DRAFT` placeholders); it runs 1 + k tokens
    allocate_kv, prepare, forward -> logits at the last token and at every draft (`logits_rows`;
                a tree's positions by depth and its mask: `mark_rows`, `tree.py`; device
                drafts written into the input ids on the device: `_fill_drafts`)
    verify   -> one read of the target's tokens (and the device drafts: the host never waits
                for the drafting alone); drafts removed again; the accepted ones and the
                target's next token are appended as ordinary output tokens;
                `num_computed_tokens` counts the accepted drafts' KV (a tree's accepted path is
                first copied into place), the rejected ones' slots are overwritten by later
                tokens

Rollback therefore needs nothing from the KV cache: a rejected draft's KV sits past
`num_computed_tokens`, which a prefix cache never inserts (it inserts full pages of computed
tokens, at `commit` after the verify), and its pages stay in the request's page table to be
reused by the next tokens (freed with the request), so nothing leaks. Drafts are limited so
their pages fit the free pages left after the step's own needs: speculation never causes a
preemption.

Overlap scheduling pauses for the steps that draft: the next step's positions and inputs
depend on how many drafts were accepted, which the host only knows after reading the verify
result (SGLang's first speculative implementation made the same choice), and a request drafts
only after its last token is known. While the switch keeps speculation off, or every running
request backs off (`BACKOFF_AFTER_MISSES`), steps overlap as plain decoding does
(`needs_tokens`).
"""

from __future__ import annotations

import logging
import sys
import time

import torch
from pegboard.core.overlap import PENDING_TOKEN
from pegboard.core.speculative import tree as T
from pegboard.core.speculative import verify as V
from pegboard.core.speculative.hidden import TargetHidden
from pegboard.core.speculative.switch import DEFAULT_MIN_SPEEDUP, SpeculationSwitch
from pegboard.sdk.device import to_device
from pegboard.sdk.types import (
    DEVICE_DRAFT,
    Drafts,
    ForwardBatch,
    Request,
    StepBudget,
    TokenLogprobs,
)

log = logging.getLogger("pegboard.speculative")

#: A request whose drafts were all rejected this many verify steps in a row stops drafting for
#: a while (2, 4, ... up to 64 steps, doubling while it keeps missing): rejected drafts cost
#: verify work, and a workload the speculator cannot guess must not pay for it every step.
BACKOFF_AFTER_MISSES = 3
BACKOFF_MAX_STEPS = 64
BACKOFF_KEY = "speculation"


class DraftViolation(Exception):
    """A speculator's `propose` result broke the hook's rules."""


def check_drafts(
    out, requests: list[Request], max_tokens: list[int], vocab: int, device=None
) -> list[Drafts]:
    """The `propose` result, checked against its hookspec (one `Drafts` per request, within
    `max_tokens`, ids in the vocabulary, a tree's parents before their children). Drafts on
    the device (`device_tokens`) are checked for their form here (a chain, a 1-D integer
    tensor on `device`, one placeholder per id); their ids only after the verify forward
    (`Speculation.verify`)."""
    if device is not None and not isinstance(device, torch.device):
        device = torch.device(device)
    if not isinstance(out, (list, tuple)) or len(out) != len(requests):
        got = f"{len(out)} entries" if isinstance(out, (list, tuple)) else type(out).__name__
        raise DraftViolation(f"expected a list of {len(requests)} Drafts, got {got}")
    for r, d, limit in zip(requests, out, max_tokens):
        if not isinstance(d, Drafts):
            raise DraftViolation(f"{r.request_id}: expected Drafts, got {type(d).__name__}")
        if len(d.tokens) > limit:
            raise DraftViolation(f"{r.request_id}: {len(d.tokens)} drafts, at most {limit} allowed")
        if d.parents is not None and not _valid_parents(d.parents, len(d.tokens)):
            raise DraftViolation(
                f"{r.request_id}: parents must give each token a parent index -1 <= p < i "
                f"(one per token): {d.parents}"
            )
        if d.probs is not None and tuple(d.probs.shape) != (len(d.tokens), vocab):
            raise DraftViolation(
                f"{r.request_id}: probs of shape {tuple(d.probs.shape)}, expected "
                f"({len(d.tokens)}, {vocab})"
            )
        if d.device_tokens is not None:
            _check_on_device(r, d, device)
    host = [d for d in out if d.device_tokens is None]
    ids = [t for d in host for t in d.tokens]  # all at once: one pass in C when they are fine
    if ids and not (set(map(type, ids)) <= _INT_TYPES and min(ids) >= 0 and max(ids) < vocab):
        for r, d in zip(requests, out):  # (the request to blame)
            if d.device_tokens is None and any(
                not isinstance(t, int) or not 0 <= t < vocab for t in d.tokens
            ):
                raise DraftViolation(f"{r.request_id}: draft ids outside [0, {vocab}): {d.tokens}")
    return list(out)


_INT_TYPES = {int, bool}  # (`isinstance(t, int)`: a bool is an int)
_INT_DTYPES = {torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8}


def _check_on_device(r: Request, d: Drafts, device) -> None:
    """`Drafts.device_tokens`' form: a chain of `len(tokens)` ids in a 1-D integer tensor on
    the model's device, `tokens` all `DEVICE_DRAFT` (the ids are checked after the verify)."""
    ids = d.device_tokens
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1 or ids.dtype not in _INT_DTYPES:
        what = f"{ids.dtype} {tuple(ids.shape)}" if isinstance(ids, torch.Tensor) else type(ids)
        raise DraftViolation(f"{r.request_id}: device_tokens must be a 1-D integer tensor: {what}")
    if d.parents is not None:
        raise DraftViolation(f"{r.request_id}: device_tokens are for chains only (no parents)")
    if ids.shape[0] != len(d.tokens) or d.tokens.count(DEVICE_DRAFT) != len(d.tokens):
        raise DraftViolation(
            f"{r.request_id}: {ids.shape[0]} device_tokens need tokens of as many DEVICE_DRAFT "
            f"placeholders (`Drafts.on_device`), got {len(d.tokens)} tokens"
        )
    on = ids.device
    if device is not None and (on.type != device.type or device.index not in (None, on.index)):
        raise DraftViolation(f"{r.request_id}: device_tokens on {ids.device}, not {device}")


def _valid_parents(parents, k: int) -> bool:
    return (
        isinstance(parents, (list, tuple))
        and len(parents) == k
        and all(isinstance(p, int) and -1 <= p < i for i, p in enumerate(parents))
    )


def eligible(r: Request) -> bool:
    """Whether a scheduled request may draft: it decodes (one uncomputed token, sampled
    already) and has no penalties (its sampler's view of earlier tokens must stay exact)."""
    p = r.params
    return (
        r.num_uncomputed_tokens == 1
        and r.token_ids[-1] != PENDING_TOKEN
        and p.presence_penalty == 0.0
        and p.frequency_penalty == 0.0
        and p.repetition_penalty == 1.0
    )


class Speculation:
    """Per-step draft bookkeeping for the engine (one instance per engine)."""

    def __init__(self, engine) -> None:
        self.engine = engine
        self._drafts: dict[int, tuple[Request, Drafts, int]] = {}  # id -> (request, drafts, len)
        self._bound = None  # the speculator `bind_target` was called for
        self._hidden: TargetHidden | None = None  # hooks capturing target hidden states
        self._last_batch: ForwardBatch | None = None
        self._kept: dict[int, list[int]] = {}  # id(request) -> rows the last verify kept
        c = engine.config
        self.switch = SpeculationSwitch(
            c.speculative_disable_by_batch_size,
            c.speculative_min_accept_rate,
            min_speedup(c.speculative_min_speedup, engine.runner.device),
        )
        self._tree_fallback_logged = False
        #: This step's drafts on the device (`Drafts.device_tokens`), as `mark_rows` put them
        #: into the verify forward's inputs (raw ids, int64), and id(request) -> its first.
        self._device_ids: torch.Tensor | None = None
        self._device_at: dict[int, int] = {}
        #: Cumulative counters for metrics (`pegboard:spec_*`, `bench offline`).
        self.num_verify = 0
        self.num_drafts = 0
        self.num_accepted = 0
        if self.speculator is not None:
            self._bind(self.speculator)  # before the model runner captures CUDA graphs

    @property
    def speculator(self):
        return self.engine.plugins.active("speculator")

    @property
    def drafting(self) -> bool:
        """Whether this step's batch carries drafts (so `verify` replaces plain sampling)."""
        return bool(self._drafts)

    # ------------------------------------------------------------------ before the forward

    def propose(
        self, scheduled: list[Request], num_tokens: list[int], budget: StepBudget
    ) -> list[int]:
        """Ask the speculator for drafts, append them to the requests' `token_ids` and return
        the step's new token counts (1 + drafts for a drafting request). Without a speculator,
        or when it fails (an error naming it, counted; no request fails), `num_tokens`."""
        self._drafts.clear()
        self._device_ids, self._device_at = None, {}
        speculator = self.speculator
        if speculator is None:
            return num_tokens
        self._bind(speculator)
        if self._hidden is not None and self._last_batch is not None:
            features = self.engine.runner.last_features  # the last forward's
            self._hidden.hand_out(self._last_batch, self._kept, features)
        self._last_batch, self._kept = None, {}
        if not self.switch.begin_step(scheduled, num_tokens, time.perf_counter()):
            return num_tokens
        e = self.engine
        limits = self.switch.trial(self._limits(scheduled, num_tokens, budget))
        asked = [(i, r) for i, r in enumerate(scheduled) if limits[i] > 0]
        if not asked:
            return num_tokens
        requests = [r for _, r in asked]
        max_tokens = [limits[i] for i, _ in asked]
        if self._hidden is not None:
            self._hidden.distribute()  # the features of steps without drafts, for the head
        try:
            out = e.hook.propose(requests=requests, max_tokens=max_tokens)
            drafts = check_drafts(out, requests, max_tokens, e.info.vocab_size, e.runner.device)
        except Exception as err:
            fault = e.guard.fault("speculator", err)
            log.error("%s; this step runs without drafts", fault)
            return num_tokens
        if not getattr(e.runner.attention, "supports_tree_mask", False):
            drafts = [self._as_chain(d) for d in drafts]
        num_tokens = list(num_tokens)
        for (i, r), d in zip(asked, drafts):
            if d.tokens:
                if d.parents is not None and T.is_chain(d.parents):
                    d = Drafts(d.tokens, probs=d.probs)
                self._drafts[id(r)] = (r, d, r.num_tokens)
                r.token_ids.extend(d.tokens)
                num_tokens[i] += len(d.tokens)
        return num_tokens

    def needs_tokens(self) -> bool:
        """Whether the next step may draft, so this step's sampled tokens must be read now
        (a request drafts only after its last token: overlap scheduling pauses). False while
        the switch keeps speculation off, and while every running request backs off
        (`BACKOFF_AFTER_MISSES`): those steps overlap like plain decoding."""
        if self.speculator is None:
            return False
        running = self.engine.running
        return self.switch.may_allow(len(running)) and not all(map(_backs_off_next, running))

    def _bind(self, speculator) -> None:
        """Give a speculator that reads the target (EAGLE) the model and capture the hidden
        states it asks for; once per speculator (again after a swap)."""
        if speculator is self._bound:
            return
        self.switch.reset()  # a new speculator gets a fresh chance
        if self._hidden is not None:
            self._hidden.remove()
            self._hidden = None
        bind = getattr(speculator, "bind_target", None)
        if bind is not None:
            bind(self.engine.runner.model)
        layers = getattr(speculator, "target_layers", None)
        if getattr(speculator, "reads_target_hidden", False) and layers:
            self._hidden = TargetHidden(self.engine.runner.model, layers)
        features = self._hidden.features if self._hidden is not None else None
        runner = self.engine.runner
        runner.set_speculation(verify_lens(speculator), features, tree_verify_lens(speculator))
        self._bound = speculator

    def _as_chain(self, d: Drafts) -> Drafts:
        """A tree cut to its first path, for an attention backend without a tree mask
        (`supports_tree_mask`; logged once)."""
        if T.is_chain(d.parents):
            return d
        if not self._tree_fallback_logged:
            log.warning(
                "the %s attention backend has no tree mask: tree drafts are cut to their first "
                "path (the torch and triton backends verify whole trees)",
                type(self.engine.runner.attention).__name__,
            )
            self._tree_fallback_logged = True
        path = T.first_path(d.parents)
        probs = d.probs[path] if d.probs is not None else None
        return Drafts([d.tokens[i] for i in path], probs=probs)

    def _limits(
        self, scheduled: list[Request], num_tokens: list[int], budget: StepBudget
    ) -> list[int]:
        """The most drafts each request may get: within the token budget, the context length,
        its `max_tokens`, the KV pages left after the step's own needs, and what the
        speculator drafts at most (`most_drafts`: without that cap the first requests' limits
        of hundreds of tokens took the whole budget, and at batch 64 with 1,024 new tokens only
        9-11 requests could draft; session 20)."""
        kv = self.engine.kv
        most = most_drafts(self.speculator)
        tokens_left = budget.max_batched_tokens - sum(num_tokens)
        needs = [kv.pages_needed(r, n) for r, n in zip(scheduled, num_tokens)]
        pages_left = kv.num_free_pages - sum(needs)
        limits = []
        for r, n, base in zip(scheduled, num_tokens, needs):
            k = 0
            # (the back-off counts every decode step, one whose last token is still pending too:
            # `needs_tokens` lets such steps overlap)
            if n == 1 and tokens_left > 0 and not _backing_off(r) and eligible(r):
                k = min(
                    tokens_left,
                    budget.max_model_len - len(r.token_ids),
                    r.params.max_tokens - len(r.output_token_ids) - 1,
                    most,
                )
                extra = kv.pages_needed(r, 1 + k) - base if k > 0 else 0
                while k > 0 and extra > pages_left:
                    k -= 1
                    extra = kv.pages_needed(r, 1 + k) - base
                k = max(k, 0)
                if k:
                    pages_left -= extra
                    tokens_left -= k
            limits.append(k)
        return limits

    def withdraw(self, requests: list[Request]) -> None:
        """Take the drafts back out of requests that will not run this step."""
        for r in requests:
            entry = self._drafts.pop(id(r), None)
            if entry is not None:
                del r.token_ids[entry[2] :]

    def mark_rows(self, batch: ForwardBatch) -> None:
        """Ask `forward` for logits at each drafting request's last token and drafts (and at
        the last token of every other sampling request), in batch order, and put drafts that
        are on the device into the input ids (their `DEVICE_DRAFT` rows: `_fill_drafts`). One
        upload at most: the rows (none when every row of the batch is one: a cached
        `arange`), a tree's positions by depth, the rows of device drafts when not every
        request has them."""
        if self._hidden is not None:
            self._last_batch = batch  # its rows' hidden states go to the requests next step
        if not self._drafts:
            return
        rows, end, every_row = [], 0, True
        tree_rows, tree_positions, masks = [], [], []
        fill_rows, on_device = [], []  # input rows of drafts on the device, and their ids
        drafts = self._drafts
        for r, q, sample in zip(batch.requests, batch.query_lens_cpu, batch.samples):
            end += q
            entry = drafts.get(id(r))
            if entry is None:
                masks.append(None)
                if sample:
                    rows.append(end - 1)
                every_row = every_row and q == 1 and sample
                continue
            d = entry[1]
            k = len(d.tokens)
            rows.extend(range(end - 1 - k, end))  # a drafting request samples
            every_row = every_row and q == k + 1
            if d.device_tokens is not None:
                self._device_at[id(r)] = len(fill_rows)
                fill_rows.extend(range(end - k, end))
                on_device.append(d.device_tokens)
            if d.parents is None:
                masks.append(None)
                continue
            masks.append(T.ancestor_mask(d.parents))
            last = entry[2] - 1  # rotary positions by depth, not by slot
            tree_rows.extend(range(end - k, end))
            tree_positions.extend(last + t for t in T.depths(d.parents))
        device = batch.input_ids.device
        # (every request drafts as many on the device: their rows are a view, no upload)
        uniform = (
            len(on_device) == len(batch.requests) and len({t.shape[0] for t in on_device}) == 1
        )
        fill = fill_rows if on_device and not uniform else []
        up = None
        if every_row and not tree_rows and not fill:
            batch.logits_rows = self.engine.runner.arange(end)
        else:
            up = to_device(rows + tree_rows + tree_positions + fill, device, torch.int64)
            batch.logits_rows = up[: len(rows)]
        if tree_rows:
            t = len(tree_rows)
            batch.tree_masks = masks
            batch.positions = batch.positions.clone()
            batch.positions[up[len(rows) : len(rows) + t]] = up[len(rows) + t : len(rows) + 2 * t]
        if on_device:
            index = up[len(up) - len(fill) :] if fill else None
            self._device_ids = self._fill_drafts(batch.input_ids, on_device, index)

    def _fill_drafts(
        self, input_ids: torch.Tensor, on_device: list[torch.Tensor], index: torch.Tensor | None
    ) -> torch.Tensor:
        """Write the drafts that are on the device into the verify forward's `input_ids` at
        the rows `index` (None: every request's rows after its first, all `k` drafts), as
        overlap scheduling fills `PENDING_TOKEN` (`model_runner._fill_pending`), clamped into
        the vocabulary (`verify` reports an id outside it). Returns the raw ids, for
        `verify`'s one read."""
        ids = on_device[0] if len(on_device) == 1 else torch.cat(on_device)
        if ids.dtype != torch.int64:
            ids = ids.to(torch.int64)
        top = self.engine.info.vocab_size - 1
        n = len(on_device)
        if index is not None:
            input_ids.index_copy_(0, index, ids.clamp(0, top))
        elif n == 1:  # (clamped straight into the rows: one operation)
            torch.clamp(ids, 0, top, out=input_ids[1:])
        else:
            torch.clamp(ids.view(n, -1), 0, top, out=input_ids.view(n, -1)[:, 1:])
        return ids

    # ------------------------------------------------------------------ after the forward

    def verify(
        self, logits: torch.Tensor, requests: list[Request]
    ) -> list[tuple[Request, list[int], list[TokenLogprobs | None]]]:
        """Verify this step's drafts; per sampling request its output tokens (and logprobs).

        Rolls every drafting request back first (drafts out of `token_ids`, KV counted up to
        its last token), then advances `num_computed_tokens` over the accepted drafts. Requests
        without drafts get their token from the `sample` hook (a `PluginFault` if it fails)."""
        rows, plain, start, greedy, pop = [], [], 0, False, self._drafts.pop
        for r in requests:
            entry = pop(id(r), None)
            if entry is None:
                rows.append((r, None, start, 0))
                plain.append((r, start))
                start += 1
                continue
            _, drafts, n = entry
            del r.token_ids[n:]
            r.num_computed_tokens = n
            k = len(drafts.tokens)
            rows.append((r, drafts, start, k))
            start += k + 1
            greedy = greedy or r.params.greedy
        # (launched before the sampler reads its tokens: the device runs both before one wait)
        argmax = logits.argmax(dim=-1) if greedy else None
        sampled = {}
        if plain:
            index = to_device([s for _, s in plain], logits.device, torch.int64)
            e, vocab = self.engine, self.engine.info.vocab_size
            out = e.guard.sample(e.hook.sample, logits[index], [r for r, _ in plain], vocab)
            e.guard.sampled_ids(out.token_ids, vocab)
            sampled = {id(r): (t, lp) for (r, _), t, lp in zip(plain, out.token_ids, out.logprobs)}
        device_ids, self._device_ids = self._device_ids, None
        if device_ids is None:
            greedy_rows = self.read_tokens(argmax) if greedy else []
        else:  # the drafts on the device come with the target's tokens: one wait
            both = self.read_tokens(torch.cat([argmax, device_ids]) if greedy else device_ids)
            greedy_rows = both[: len(both) - device_ids.shape[0]]  # (`len`: a Python call)
            self._read_device_drafts(rows, both[len(greedy_rows) :])
        results = []
        moves: list[tuple[Request, int, list[int]]] = []
        step_drafted = step_accepted = step_requests = step_tokens = drafted = 0
        hidden = self._hidden is not None  # (EAGLE: the rows whose hidden states stand)
        for r, drafts, s, k in rows:
            if drafts is None:
                token, lp = sampled[id(r)]
                results.append((r, [token], [lp]))
                step_tokens += 1
                continue
            params = r.params
            if params.greedy:
                verdict = V.accept_greedy(greedy_rows[s : s + k + 1], drafts)
            else:
                gen = V.generator_for(r, logits.device, self.engine.config.seed)
                verdict = V.accept_sampled(V.target_probs(logits[s : s + k + 1], r), drafts, gen)
            tokens, path = verdict.tokens, verdict.path
            accepted = len(path)
            _record(r, accepted)
            tree = drafts.parents is not None
            if tree and path != list(range(accepted)):
                moves.append((r, r.num_computed_tokens - 1, path))
            r.num_computed_tokens += accepted
            r.num_spec_steps += 1
            r.num_draft_tokens += k
            r.num_accepted_tokens += accepted
            drafted += k
            step_drafted += max(T.depths(drafts.parents)) if tree else k
            step_accepted += accepted
            step_requests += 1
            step_tokens += len(tokens)
            lps: list[TokenLogprobs | None] = [None] * len(tokens)
            if hidden or params.logprobs is not None:
                kept = [0] + [1 + i for i in path]  # the rows the output tokens came from
                if hidden:
                    self._kept[id(r)] = kept
                if params.logprobs is not None:
                    index = to_device([s + i for i in kept], logits.device, torch.int64)
                    lps = V.logprobs_of(logits[index], tokens, params.logprobs)
            results.append((r, tokens, lps))
        self.num_verify += step_requests
        self.num_drafts += drafted
        self.num_accepted += step_accepted
        if moves:  # a tree's accepted path, into place
            T.compact_kv(self.engine.kv.pool, moves)
        self.switch.record(step_drafted, step_accepted, step_requests)  # trees: by depth
        self.switch.tokens(step_tokens)
        return results

    def _read_device_drafts(self, rows: list, ids: list[int]) -> None:
        """Replace the drafts that were on the device by their ids (`ids`: `mark_rows`'
        order) in `verify`'s rows. A request whose ids are not all in the vocabulary is the
        speculator's fault (logged and counted as a `propose` violation) and keeps no draft:
        its first output token comes from its last real token's row, which no draft reaches
        (the forward ran on clamped ids), so the outputs stay exact."""
        at, vocab = self._device_at, self.engine.info.vocab_size
        ok = min(ids) >= 0 and max(ids) < vocab
        for i, (r, drafts, s, k) in enumerate(rows):
            if drafts is None or drafts.device_tokens is None:
                continue
            mine = ids[at[id(r)] : at[id(r)] + k]
            if ok or all(0 <= t < vocab for t in mine):
                rows[i] = (r, Drafts(mine, probs=drafts.probs), s, k)
                continue
            err = DraftViolation(f"{r.request_id}: draft ids outside [0, {vocab}): {mine}")
            log.error("%s; no draft of it is accepted", self.engine.guard.fault("speculator", err))
            rows[i] = (r, Drafts([]), s, k)

    @staticmethod
    def read_tokens(tokens: torch.Tensor) -> list[int]:
        """The target's tokens on the host: where a verify step waits for the device (the one
        synchronizing call of a greedy verify; `HostProfile` books it as a wait)."""
        return tokens.tolist()

    def report(self, since: dict[str, float]) -> dict[str, float]:
        """The figures since an earlier `stats()` (`bench offline`): verify steps, draft and
        accepted tokens, acceptance rate and length (tokens per verify step), the steps the
        on/off switch ran without drafts and its trials (steps where a few requests drafted)."""
        now = self.stats()
        n = now["spec_verify_steps"] - since["spec_verify_steps"]
        drafts = now["spec_draft_tokens"] - since["spec_draft_tokens"]
        accepted = now["spec_accepted_tokens"] - since["spec_accepted_tokens"]
        return {
            "speculator": self.speculator.name if self.speculator else None,
            "verify_steps": n,
            "draft_tokens": drafts,
            "accepted_tokens": accepted,
            "accept_rate": round(accepted / drafts, 4) if drafts else 0.0,
            "accept_length": round((accepted + n) / n, 3) if n else 0.0,
            "switch_off_steps": now["spec_switch_off_steps"] - since["spec_switch_off_steps"],
            "switch_trials": now["spec_switch_trials"] - since["spec_switch_trials"],
            **(self.switch.speeds if self.switch.min_speedup is not None else {}),
        }

    def metrics(self) -> dict[str, float]:
        """The on/off switch's cumulative decisions for the step snapshot's `extra` (exported
        as `pegboard:spec_switch_off_steps_total{reason}` and
        `pegboard:spec_switch_turned_off_total`); empty without a speculator."""
        if self.speculator is None:
            return {}
        sw = self.switch
        return {
            "spec_switch_off_steps_accept_rate": sw.off_steps["accept_rate"],
            "spec_switch_off_steps_batch_size": sw.off_steps["batch_size"],
            "spec_switch_off_steps_speed": sw.off_steps["speed"],
            "spec_switch_turned_off": sw.num_turned_off,
        }

    def stats(self) -> dict[str, float]:
        """Cumulative verify steps, draft and accepted tokens, and the mean acceptance length
        (tokens per verify step, the target's own token included)."""
        n = self.num_verify
        return {
            "spec_verify_steps": n,
            "spec_draft_tokens": self.num_drafts,
            "spec_accepted_tokens": self.num_accepted,
            "spec_accept_length": (self.num_accepted + n) / n if n else 0.0,
            "spec_accept_rate": self.num_accepted / self.num_drafts if self.num_drafts else 0.0,
            "spec_switch_off_steps": self.switch.num_off_steps,  # steps the switch ran plain
            "spec_switch_trials": self.switch.num_trials,  # steps drafting for a few requests
        }


def min_speedup(setting: float | None, device: torch.device) -> float | None:
    """The speed rule's threshold (`switch.py`): `--speculative-min-speedup` when set (0: off),
    else `DEFAULT_MIN_SPEEDUP` on CUDA and off elsewhere (on a CPU the engine is the
    correctness reference: which steps draft must not depend on the clock)."""
    if setting is not None:
        return setting or None
    return DEFAULT_MIN_SPEEDUP if torch.device(device).type == "cuda" else None


def most_drafts(speculator) -> int:
    """The most draft tokens `speculator` proposes for one request in a step: its chain's
    length or its tree's size (`Speculator.chain_length` / `tree_size`), else unbounded."""
    for method in ("chain_length", "tree_size"):
        k = getattr(speculator, method, lambda: None)()
        if k:
            return k
    return sys.maxsize


def verify_lens(speculator) -> list[int]:
    """The verify steps' query lengths worth CUDA graphs for `speculator`: its chain's length
    plus the last token (`Speculator.chain_length`); none for trees or unknown lengths."""
    chain_length = getattr(speculator, "chain_length", None)
    k = chain_length() if chain_length is not None else None
    return [k + 1] if k else []


def tree_verify_lens(speculator) -> list[int]:
    """The tree verify steps' query lengths worth CUDA graphs for `speculator`: its largest
    tree plus the last token (`Speculator.tree_size`); none for chains or unknown sizes."""
    tree_size = getattr(speculator, "tree_size", None)
    k = tree_size() if tree_size is not None else None
    return [k + 1] if k else []


def _backing_off(r: Request) -> bool:
    """Whether the request skips drafting this step (see `BACKOFF_AFTER_MISSES`)."""
    state = r.plugin_state.get(BACKOFF_KEY)
    if not state or state[1] <= 0:
        return False
    state[1] -= 1
    return True


def _backs_off_next(r: Request) -> bool:
    """Whether the request will skip drafting in the next step (`_backing_off` without
    counting)."""
    state = r.plugin_state.get(BACKOFF_KEY)
    return bool(state) and state[1] > 0


def _record(r: Request, accepted: int) -> None:
    state = r.plugin_state.setdefault(BACKOFF_KEY, [0, 0])  # [misses in a row, steps to skip]
    if accepted:
        state[0] = 0
        return
    state[0] += 1
    if state[0] >= BACKOFF_AFTER_MISSES:
        state[1] = min(2 ** (state[0] - BACKOFF_AFTER_MISSES + 1), BACKOFF_MAX_STEPS)
