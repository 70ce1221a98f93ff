"""The model runner: turns the scheduled requests into one flattened forward pass."""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
from pathlib import Path

import numpy as np
import torch
from pegboard.core.cuda_graph import CUDAGraphRunner, capture_sizes, graph_unsupported_reason
from pegboard.core.cuda_graph_mixed import (
    MixedGraphRunner,
    mixed_graph_unsupported_reason,
    mixed_token_sizes,
)
from pegboard.core.models import load_model
from pegboard.core.overlap import PENDING_TOKEN, PendingStep
from pegboard.core.page_tables import PageTableMirror
from pegboard.sdk.device import to_device
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, ModelInfo, Request

log = logging.getLogger("pegboard.model_runner")


#: On a CPU, a step gets one intra-op thread per this many floating-point operations of model
#: work (`ModelRunner.host_threads`): below it, OpenMP's fork/join costs more than it saves,
#: and on a loaded machine a thread waiting for a busy core stalls every op (a 64-wide
#: projection took 30 ms with 2 threads against 20 us with one on this project's 2-core CI).
CPU_FLOPS_PER_THREAD = 1 << 26


class ModelRunner:
    """Owns the loaded model and runs it on a `ForwardBatch` with the active attention backend.

    `prepare` lays the scheduled tokens out flat (ids, positions, KV slots) and `forward` runs
    the model and returns logits for the requests that sample this step. The runner never
    touches request bookkeeping: the engine advances `num_computed_tokens`.

    Decode-only batches (and, with speculation, verify batches: `set_speculation`) replay CUDA
    graphs (`pegboard.core.cuda_graph`) when `set_attention` captured them: `cuda_graphs` is
    then the graph runner, otherwise None and `cuda_graph_off_reason` says why. Mixed steps
    (prefill tokens next to decodes) replay graphs of their token count
    (`pegboard.core.cuda_graph_mixed`) where `mixed_graphs` is set (`mixed_graph_off_reason`).
    """

    def __init__(
        self,
        model_dir: str | Path,
        dtype: str = "auto",
        device: str = "auto",
        max_model_len: int | None = None,
        progress: bool = True,
        load_format: str = "auto",
        fused_kernels: bool = True,
        tp=None,
        linear=None,
    ) -> None:
        loaded = load_model(
            model_dir,
            dtype,
            device,
            max_model_len,
            progress,
            load_format,
            fused_kernels,
            tp,
            linear=linear,  # the `linear` plugin (`select_linear`); None: by the checkpoint
        )
        self.tp = tp  # a `pegboard.core.distributed.TensorParallel`: rank 0 shares each batch
        self.model = loaded.model
        # Logits stay in the model's dtype (`forward`): no float32 copy per step.
        self.model.logits_dtype = None
        self.config = loaded.config
        self.info: ModelInfo = loaded.info
        self.device: torch.device = loaded.info.device
        if self.device.index is not None:  # kernels launch on the current device: make it ours
            torch.cuda.set_device(self.device)
        self.attention: AttentionBackend | None = None
        self.cuda_graphs: CUDAGraphRunner | None = None
        self.cuda_graph_off_reason: str | None = "no attention backend is bound yet"
        self.mixed_graphs: MixedGraphRunner | None = None
        self.mixed_graph_off_reason: str | None = self.cuda_graph_off_reason
        self._graph_settings = (0, 0, 0)  # `set_attention`'s graph arguments
        #: Speculative decoding (`set_speculation`): verify query lengths to capture graphs
        #: for, and a function of the target's hidden states run after every forward.
        self._verify_lens: tuple[int, ...] = ()
        self._tree_lens: tuple[int, ...] = ()  # ... and tree verify steps'
        self._features = None
        #: `_features`' result for the last forward's tokens (batch row order), or None.
        self.last_features: torch.Tensor | None = None
        self._flops_per_token: int | None = None  # `host_threads`, counted on first use
        #: The scheduled requests' page tables as one array, updated incrementally; the
        #: engine `forget`s a request when it releases it.
        self.page_tables = PageTableMirror()
        self._arange = torch.zeros(0, dtype=torch.int64)  # `arange`'s device copy

    def on_device(self) -> contextlib.AbstractContextManager:
        """Make this runner's GPU the current CUDA device for the block (a no-op on a CPU).
        The current device is per thread, and a server steps the engine on its own thread;
        two engines of one process (PD tests) may sit on different GPUs."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        return torch.cuda.device(self.device)

    def host_threads(self, num_tokens: list[int]) -> contextlib.AbstractContextManager:
        """On a CPU, run a step of `num_tokens` (per request) with no more intra-op threads than
        `CPU_FLOPS_PER_THREAD` of work each (a context manager; torch's setting is restored
        on exit). Elsewhere, or when every thread has work, a no-op."""
        if self.device.type != "cpu":
            return contextlib.nullcontext()
        if self._flops_per_token is None:
            self._flops_per_token = 2 * sum(p.numel() for p in self.model.parameters())
        have = torch.get_num_threads()
        want = max(1, min(have, self._flops_per_token * sum(num_tokens) // CPU_FLOPS_PER_THREAD))
        return contextlib.nullcontext() if want == have else _intra_op_threads(want, have)

    def release_graphs(self) -> None:
        """Destroy the captured CUDA graphs now (the eager path serves any later batch). A
        tensor-parallel rank calls this before leaving its process groups: NCCL's teardown
        waits until every graph that captured one of its collectives is destroyed, so graphs
        still alive then hang it (and the process aborts at exit)."""
        self.cuda_graphs = self.mixed_graphs = None
        self.cuda_graph_off_reason = self.mixed_graph_off_reason = "released"
        gc.collect()  # graphs held in reference cycles go too
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def set_attention(
        self,
        backend: AttentionBackend,
        cuda_graph_max_bs: int = 0,
        max_requests: int = 0,
        mixed_max_tokens: int = 0,
    ) -> None:
        """Use `backend` from the next forward on (at start and after an attention or KV cache
        swap), dropping graphs captured for the previous backend.

        With `cuda_graph_max_bs` > 0, capture decode graphs for batches of up to that many
        requests (at most `max_requests`, the most any batch will hold) where the device and
        backend allow, the LM head inside them (without it if that capture fails), and with
        `mixed_max_tokens` > 0 (and decode graphs) mixed-step graphs of up to that many
        tokens. A failed capture leaves graphs off and logs why: the eager path serves the
        same batches."""
        self.attention = backend
        self.cuda_graphs = self.mixed_graphs = None
        self._graph_settings = (cuda_graph_max_bs, max_requests, mixed_max_tokens)
        reason = graph_unsupported_reason(self.device, backend)
        if cuda_graph_max_bs < 1:
            reason = "CUDA graphs are disabled (--disable-cuda-graph or --cuda-graph-max-bs 0)"
        self.cuda_graph_off_reason = self.mixed_graph_off_reason = reason
        if reason is not None:
            return
        sizes = capture_sizes(min(cuda_graph_max_bs, max(max_requests, 1)))
        # The LM head in the decode graphs, else (a head that cannot be captured, e.g. a
        # linear plugin's that synchronises) the graphs without it, as before it was in them.
        for vocab_size in (self.info.vocab_size, 0):
            try:
                self.cuda_graphs = CUDAGraphRunner(
                    self.model,
                    backend,
                    sizes,
                    max_requests,
                    self.info.max_model_len,
                    backend.pool.page_size,
                    self.device,
                    query_lens=self._verify_lens,
                    features=self._features,
                    tree_query_lens=self._tree_lens,
                    vocab_size=vocab_size,
                    logits_dtype=self.info.dtype,
                )
                self.cuda_graph_off_reason = None
                break
            except Exception as e:
                log.warning(
                    "CUDA graph capture %s failed: %s",
                    "with the LM head" if vocab_size else "(without the LM head)",
                    e,
                    exc_info=True,
                )
                self.cuda_graph_off_reason = f"capture failed: {type(e).__name__}: {e}"
        if self.cuda_graphs is None:
            log.warning("decode runs eagerly: %s", self.cuda_graph_off_reason)
            self.mixed_graph_off_reason = "decode graphs are off"
            return
        self._capture_mixed(backend, max(max_requests, sizes[-1]), mixed_max_tokens)

    def _capture_mixed(self, backend: AttentionBackend, max_requests: int, max_tokens: int):
        reason = mixed_graph_unsupported_reason(backend, max_tokens)
        self.mixed_graph_off_reason = reason
        if reason is not None:
            return
        try:
            self.mixed_graphs = MixedGraphRunner(
                self.model,
                backend,
                mixed_token_sizes(max_tokens),
                max_requests,
                self.device,
                features=self._features,
            )
        except Exception as e:
            log.warning("mixed-step CUDA graph capture failed: %s", e, exc_info=True)
            self.mixed_graph_off_reason = f"capture failed: {type(e).__name__}: {e}"

    def set_speculation(self, verify_lens: list[int], features=None, tree_lens=()) -> None:
        """Speculative decoding: capture verify graphs for steps of up to `verify_lens` tokens
        per request (`tree_lens`: with draft trees), and run `features` (the target hidden
        states an EAGLE head reads, from forward hooks) after every forward, eager or
        replayed, keeping its result in `last_features`. Graphs already captured are captured
        again if this changes them."""
        lens, trees = tuple(sorted(set(verify_lens))), tuple(sorted(set(tree_lens)))
        if (lens, trees, features) == (self._verify_lens, self._tree_lens, self._features):
            return
        self._verify_lens, self._tree_lens, self._features = lens, trees, features
        self.last_features = None
        if self.attention is not None and self.cuda_graph_off_reason is None:
            self.set_attention(self.attention, *self._graph_settings)

    def prepare(
        self,
        requests: list[Request],
        num_tokens: list[int],
        page_size: int,
        pending: PendingStep | None = None,
    ) -> ForwardBatch:
        """Flatten the next `num_tokens[i]` uncomputed tokens of each request into a batch.

        Each request's `page_table` must already cover `num_computed_tokens + n` tokens. A
        request whose last token is still `PENDING_TOKEN` (overlap scheduling) takes it from
        `pending`: on the device, without waiting for the previous step."""
        batch = self._prepare_decode(requests, num_tokens, page_size, pending)
        if batch is not None:
            return batch
        b = len(requests)
        # Whole-list passes (a mixed step holds hundreds of decode rows beside its prefill
        # chunks); the errors name the first request at fault.
        lens = np.fromiter(num_tokens, np.int64, b)
        first = np.fromiter([r.num_computed_tokens for r in requests], np.int64, b)
        stops = first + lens
        totals = np.fromiter([len(r.token_ids) for r in requests], np.int64, b)
        tables = [r.page_table for r in requests]
        held = np.fromiter(map(len, tables), np.int64, b)
        pages = -(-stops // page_size)
        if (lens < 1).any() or (stops > totals).any() or (held < pages).any():
            _raise_unfit(requests, num_tokens, page_size)
        ids = list(
            itertools.chain.from_iterable(
                [r.token_ids[s : s + n] for r, s, n in zip(requests, first.tolist(), num_tokens)]
            )
        )
        num_pages_each = pages.tolist()
        page_tables = [t if len(t) == k else t[:k] for t, k in zip(tables, num_pages_each)]
        query_lens, seq_lens = list(num_tokens), stops.tolist()
        sample_at = stops == totals
        samples = sample_at.tolist()
        ends = np.cumsum(lens)
        fill_at, fill_from = [], []  # flat input rows whose token is pending, and its row there
        for i in np.flatnonzero(sample_at).tolist():
            r = requests[i]
            if r.token_ids[-1] == PENDING_TOKEN:
                if pending is None or id(r) not in pending.rows:
                    raise ValueError(f"request {r.request_id}: its last token is not sampled yet")
                fill_at.append(int(ends[i]) - 1)
                fill_from.append(pending.rows[id(r)])
        if fill_at and pending.host_ids is not None:  # the host has them: no device work
            for at, row in zip(fill_at, fill_from):
                ids[at] = pending.host_ids[row]
            fill_at = []
        # Positions and KV slots of every token in numpy (a prefill chunk's thousands of tokens
        # never become Python ints), the slots read from the page-table array the batch carries.
        table = self.page_tables.gather(requests, num_pages_each)
        owner = np.repeat(np.arange(len(lens)), lens)  # the request of each flat row
        positions = np.arange(len(ids), dtype=np.int64) + np.repeat(first - (ends - lens), lens)
        slots = table[owner, positions // page_size] * np.int64(page_size) + positions % page_size
        # One host-to-device copy (each part 16-byte aligned: `_upload`)
        up = _upload(
            {
                "positions": positions,
                "slots": slots,
                "ids": np.asarray(ids, dtype=np.int64),
                "rows": ends - 1,
                "fill": np.asarray(fill_at + fill_from, dtype=np.int64),
            },
            self.device,
        )
        input_ids = _fill_pending(up["ids"], up["fill"], pending) if fill_at else up["ids"]
        return ForwardBatch(
            requests=list(requests),
            input_ids=input_ids,
            positions=up["positions"],
            slot_mapping=up["slots"],
            query_lens_cpu=query_lens,
            seq_lens_cpu=seq_lens,
            page_tables_cpu=page_tables,
            logits_indices=up["rows"],
            samples=samples,
            page_tables_array=table,
        )

    def _prepare_decode(
        self,
        requests: list[Request],
        num_tokens: list[int],
        page_size: int,
        pending: PendingStep | None,
    ) -> ForwardBatch | None:
        """`prepare` for the common step where every request decodes its last token: whole-list
        passes and numpy instead of the per-request loop, the KV slots read from the
        page-table array. None when the step is anything else (the general path, which also
        raises the errors, handles it)."""
        n = len(requests)
        if not n or len(num_tokens) != n or sum(num_tokens) != n:  # every n >= 1, so all 1
            return None
        # (comprehensions: faster than `map(attrgetter)` under CPython's specialized attribute reads)
        starts = np.fromiter([r.num_computed_tokens for r in requests], np.int64, n)
        lengths = np.fromiter([len(r.token_ids) for r in requests], np.int64, n)
        if (lengths != starts + 1).any():
            return None
        num_pages = starts // page_size + 1
        table_lens = np.fromiter([len(r.page_table) for r in requests], np.int64, n)
        if (table_lens < num_pages).any():
            return None
        if pending is not None and requests == pending.requests:
            # The batch sampled last step, in its order: every last token is pending, row i.
            last = pending.host_ids  # None: only on the device
            fill = [] if last is not None else None
        else:
            last, fill = self._decode_inputs(requests, pending)
            if last is None and fill is None:
                return None  # the general path names the request
        table = self.page_tables.gather(requests, num_pages, table_lens)
        slots = table[np.arange(n), starts // page_size].astype(np.int64) * page_size
        slots += starts % page_size
        # One upload: the input ids (unless all on the device), positions, KV slots, the
        # pending ids' rows (`fill`).
        parts = {"positions": starts, "slots": slots}
        if last is not None:
            parts["ids"] = np.asarray(last, dtype=np.int64)
        if fill:
            parts["fill"] = np.asarray(fill, dtype=np.int64)
        up = _upload(parts, self.device)
        if last is None:  # input ids straight from the device, in row order
            input_ids = pending.tokens
        else:
            input_ids = _fill_pending(up["ids"], up.get("fill", up["ids"][:0]), pending)
        if (table_lens == num_pages).all():
            page_tables_cpu = [r.page_table for r in requests]
        else:
            page_tables_cpu = [
                r.page_table if len(r.page_table) == m else r.page_table[:m]
                for r, m in zip(requests, num_pages.tolist())
            ]
        return ForwardBatch(
            requests=list(requests),
            input_ids=input_ids,
            positions=up["positions"],
            slot_mapping=up["slots"],
            query_lens_cpu=[1] * n,
            seq_lens_cpu=lengths.tolist(),
            page_tables_cpu=page_tables_cpu,
            logits_indices=self.arange(n),
            samples=[True] * n,
            page_tables_array=table,
        )

    def arange(self, n: int) -> torch.Tensor:
        """0 ... n - 1 on the device (a decode batch's logits rows, a verify batch's), cut from
        one kept tensor (no upload per step; read-only: callers index with it)."""
        if self._arange.shape[0] < n:
            self._arange = to_device(np.arange(max(n, 64), dtype=np.int64), self.device)
        return self._arange[:n]

    @staticmethod
    def _decode_inputs(
        requests: list[Request], pending: PendingStep | None
    ) -> tuple[list[int] | None, list[int] | None]:
        """The last token of each request (a batch other than the pending step's): ids, with
        pending ones taken from the host when it has them, and the pending ones' input rows
        followed by their rows in `pending.tokens` (empty: none left on the device). (None,
        None): a pending token with no pending step."""
        last = [r.token_ids[-1] for r in requests]
        fill_at = [i for i, t in enumerate(last) if t == PENDING_TOKEN]
        if not fill_at:
            return last, []
        if pending is None or any(id(requests[i]) not in pending.rows for i in fill_at):
            return None, None
        fill_from = [pending.rows[id(requests[i])] for i in fill_at]
        if pending.host_ids is not None:  # the host has them: no device work
            for at, row in zip(fill_at, fill_from):
                last[at] = pending.host_ids[row]
            return last, []
        return last, fill_at + fill_from

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the model; logits `[number of sampling requests, vocab]` in batch order, in the
        model's dtype (the engine hands a sampler float32 unless it takes the model's dtype:
        `Sampler.logits_in_model_dtype`; converting is exact, so only the copy is saved)."""
        if self.attention is None:
            raise RuntimeError("ModelRunner.set_attention must be called before forward")
        if self.tp is not None:
            self.tp.share_batch(batch)  # the followers run the same step on their shards
        graphs = self.cuda_graphs
        replay = graphs is not None and graphs.can_run(batch)
        if not replay and self.mixed_graphs is not None:  # prefill tokens beside decodes
            graphs = self.mixed_graphs
            replay = graphs.can_run(batch)
        if not replay:
            self.attention.prepare(batch)  # a replay prepares the backend for its own layout
        every_row = batch.logits_rows is None and all(batch.samples)
        if every_row:
            rows = batch.logits_indices
        else:
            rows = batch.logits_rows  # speculative decoding: every draft is verified
            if rows is None:
                samples = [i for i, s in enumerate(batch.samples) if s]
                rows = batch.logits_indices[to_device(samples, self.device, torch.int64)]
        if replay:
            hidden = graphs.replay(batch)
            self.last_features = graphs.features
            if graphs.logits is not None:  # a decode graph ran the LM head on its rows
                # (a decode batch's row i is request i's token: `logits_indices` is arange)
                return graphs.logits if every_row else graphs.logits[rows]
        else:
            hidden = self.model(batch.input_ids, batch.positions, self.attention)
            self.last_features = self._features() if self._features is not None else None
        return self.model.compute_logits(hidden[rows])

    @torch.inference_mode()
    def profile_activation_bytes(self, max_tokens: int, max_requests: int) -> int:
        """Peak device memory one step can take beyond the weights (CUDA only, else 0).

        Runs the model once on `max_tokens` tokens (the largest step the budget allows) with
        attention replaced by a stand-in that keeps no KV, then computes float32 logits for as
        many rows as can sample in one step and the temporaries a sampler makes of them
        (softmax, a random race, the quotient). The KV pool is sized after subtracting this,
        so no step can run out of memory once the pool is allocated (as vLLM's profile run).
        """
        if self.device.type != "cuda":
            return 0
        if self.tp is not None:
            self.tp.share_profile(max_tokens, max_requests)  # its all-reduces need every rank
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        baseline = torch.cuda.memory_allocated(self.device)
        vocab = self.info.vocab_size
        ids = torch.randint(0, vocab, (max_tokens,), device=self.device)
        positions = torch.arange(max_tokens, device=self.device) % self.info.max_model_len
        hidden = self.model(ids, positions, _NoKVAttention())
        rows = min(max_requests, max_tokens)
        logits = self.model.compute_logits(hidden[-rows:]).float()  # a float32 sampler's
        del hidden
        probs = logits.softmax(dim=-1)
        race = torch.empty_like(probs).exponential_()
        (probs / race).argmax(dim=-1)
        del logits, probs, race
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - baseline
        torch.cuda.empty_cache()
        return int(peak)


#: One int64 of padding (`_upload`).
_PAD = np.zeros(1, dtype=np.int64)


def _upload(parts: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """int64 arrays on the device in one copy: each name's part of it, each part starting
    16-byte aligned (an odd part is followed by one int64 of padding): Triton keys a pointer
    by its alignment, so an odd batch would otherwise compile the kernels that read the
    slots a second time."""
    arrays = []
    for values in parts.values():
        arrays.append(values)
        if len(values) & 1:
            arrays.append(_PAD)
    flat = to_device(np.concatenate(arrays), device, torch.int64)
    out, at = {}, 0
    for name, values in parts.items():
        out[name] = flat[at : at + len(values)]
        at += len(values) + (len(values) & 1)
    return out


def _raise_unfit(requests: list[Request], num_tokens: list[int], page_size: int) -> None:
    """The `prepare` error for the first request whose tokens or pages do not fit its step."""
    for r, n in zip(requests, num_tokens):
        start, stop = r.num_computed_tokens, r.num_computed_tokens + n
        if n < 1 or stop > r.num_tokens:
            raise ValueError(
                f"request {r.request_id}: cannot run {n} tokens from {start} (it has {r.num_tokens})"
            )
        num_pages = -(-stop // page_size)
        if len(r.page_table) < num_pages:
            raise ValueError(
                f"request {r.request_id}: page_table has {len(r.page_table)} pages, "
                f"{num_pages} are needed for {stop} tokens"
            )


def _fill_pending(
    input_ids: torch.Tensor, index: torch.Tensor, pending: PendingStep | None
) -> torch.Tensor:
    """Write the previous step's sampled tokens, still on the device, into `input_ids`:
    `index` holds the input rows, then their rows in `pending.tokens` (empty: nothing to do)."""
    k = index.shape[0] // 2
    if k:
        input_ids.index_copy_(0, index[:k], pending.tokens.index_select(0, index[k:]))
    return input_ids


@contextlib.contextmanager
def _intra_op_threads(threads: int, restore: int):
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(restore)


class _NoKVAttention:
    """Stands in for the attention backend in `profile_activation_bytes`: an output of the
    query's shape, no KV stored (the pool does not exist yet)."""

    def forward(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        return torch.empty_like(q)
