"""The data types plugins see.

These are plain dataclasses shared by the core and every plugin. A plugin may read every field;
the fields a plugin may write are named in the docstring of the slot it implements
(`pegboard.sdk.slots`).
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from pegboard.sdk.zeroed import zeros

#: `SamplingParams.output_kind`: a text delta per step, or only the request's final output.
OUTPUT_KINDS = ("delta", "final")


@dataclass
class SamplingParams:
    """How one request's tokens are chosen and when it stops (OpenAI semantics where they exist).

    `temperature == 0` means greedy. `top_k <= 0` and `top_p == 1` and `min_p == 0` disable those
    filters. `logprobs` is the number of top alternatives to return per generated token (`None`:
    no logprobs at all; `0`: only the chosen token's logprob). `seed` makes sampling reproducible
    per request regardless of what else is in the batch.

    `output_kind` is what the engine's detokenizer delivers for the request (vLLM's
    `RequestOutputKind`): `"delta"` (the default, the streaming view) one text delta per step,
    which concatenate to the whole text; `"final"` nothing until the request ends (a token
    stop, a stop string, max tokens, an abort or an error), then one finished output whose
    `text` is that whole text (what the deltas would have concatenated to) and whose other
    fields are those of the last delta. `LLM.generate` uses `"final"`: it returns only the end.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    output_kind: str = "delta"  # "delta": a text delta per step; "final": one output at the end

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        problems = []
        if self.max_tokens < 1:
            problems.append("max_tokens must be >= 1")
        if self.temperature < 0:
            problems.append("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            problems.append("top_p must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            problems.append("min_p must be in [0, 1]")
        if self.repetition_penalty <= 0:
            problems.append("repetition_penalty must be > 0")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            problems.append("logprobs must be in [0, 20]")
        if self.output_kind not in OUTPUT_KINDS:
            problems.append(f"output_kind must be one of {OUTPUT_KINDS}, got {self.output_kind!r}")
        if problems:
            raise ValueError("; ".join(problems))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # never run, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV pages; scheduled in some or every step
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens or the model's context length
    ABORT = "abort"  # cancelled by the client or the operator
    ERROR = "error"  # a plugin raised while serving this request


_request_counter = itertools.count()


@dataclass(eq=False)
class Request:
    """One generation request as it moves through the engine.

    Token bookkeeping: `token_ids` is prompt + generated tokens. `num_computed_tokens` counts the
    leading tokens of `token_ids` whose KV is in the cache (after a prefix-cache hit it jumps
    forward; after preemption it returns to 0). `page_table` lists the KV pages holding those
    tokens, in order: token `i` lives in page `page_table[i // page_size]`, slot
    `i % page_size`. Only the active KV cache plugin writes `page_table` and
    `num_cached_tokens`; only the core writes the rest.
    """

    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    priority: int = 0  # lower value = more important (as in vLLM)
    arrival_time: float = field(default_factory=time.monotonic)
    eos_token_ids: frozenset[int] = frozenset()

    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from a prefix cache at admission
    page_table: list[int] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    error: str | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None
    #: Sequence number in arrival order; ties in every policy break on it.
    seq: int = field(default_factory=lambda: next(_request_counter))
    #: Scratch space for plugins, keyed by plugin name (e.g. a seeded RNG of the sampler).
    plugin_state: dict[str, Any] = field(default_factory=dict)
    #: Speculative decoding (`pegboard.core.speculative`): verify steps run for this request,
    #: draft tokens proposed and accepted over them.
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{self.seq}"
        self.token_ids: list[int] = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens that must still pass through the model before the next token can be sampled."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefill(self) -> bool:
        """True while more than one token is uncomputed (first prefill or recompute after preemption)."""
        return self.num_uncomputed_tokens > 1

    @property
    def finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_token(self, token_id: int, logprobs: TokenLogprobs | None = None) -> None:
        self.extend_tokens((token_id,), () if logprobs is None else (logprobs,))

    def extend_tokens(self, token_ids, logprobs=()) -> None:
        """Append output tokens at once (a step's sampled token, or a verify step's accepted
        drafts and the target's token) and the logprobs of those that asked for them."""
        self.token_ids += token_ids
        self.output_token_ids += token_ids
        if logprobs:
            self.output_logprobs += logprobs


@dataclass
class TokenLogprobs:
    """The chosen token's logprob and the top alternatives (token id, logprob), best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class ScheduledRequest:
    """A request and how many of its uncomputed tokens run in this step."""

    request: Request
    num_tokens: int


@dataclass
class StepBudget:
    """Limits a scheduling decision must respect in one step."""

    max_batched_tokens: int  # tokens of all scheduled requests together (chunked-prefill budget)
    max_running_requests: int  # requests holding KV at once
    max_model_len: int  # context length of the model


@dataclass
class SchedulePlan:
    """What `schedule` returns: who runs this step, and who gives up its KV first.

    `preempted` requests lose their KV (freed by the core before allocation) and go back to the
    front of the waiting queue; they are recomputed later and finish with the same output.
    `scheduled` is in execution order; every request in it must fit the budget and the KV cache
    once the preempted requests' pages are freed.
    """

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)

    def __bool__(self) -> bool:
        return bool(self.scheduled or self.preempted)


@dataclass
class ModelInfo:
    """Shape facts about the loaded model that kernels and caches size themselves by."""

    architecture: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_model_len: int
    dtype: torch.dtype
    device: torch.device


@dataclass
class KVPool:
    """The KV cache storage: per layer, a key and a value tensor of shape
    `[num_pages, page_size, num_kv_heads, head_dim]` (FlashInfer's NHD paged layout).

    Created by the core, sized by the active cache plugin, read and written by the attention
    backend. Cache plugins that move KV (e.g. a host tier) copy pages between pools.
    """

    k: list[torch.Tensor]
    v: list[torch.Tensor]
    page_size: int
    #: How the value tensors are laid out in memory (their shape is the same either way):
    #: `"nhd"` like the keys, or `"hdp"` (FP8 pools only, `--kv-cache-layout hdp`), each
    #: page's values `[num_kv_heads, head_dim, page_size]`: tokens contiguous, the K-major
    #: operand FP8 tensor cores need for `P @ V` (docs/kernels.md, "FP8 tensor-core decode");
    #: `v[layer]` is then a permuted view of that storage. A page is one contiguous block of
    #: bytes either way, so page copies between pools of the same layout are byte copies.
    #: Attention backends declare the layouts they read (`v_layouts`); the core refuses others.
    v_layout: str = "nhd"

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[0] if self.k else 0

    #: Per-layer scales of a quantized (FP8) pool: a stored value times its layer's scale is
    #: the key or value (attention backends fold them into their math). Empty: all 1.0.
    k_scales: list[float] = field(default_factory=list)
    v_scales: list[float] = field(default_factory=list)

    @property
    def dtype(self) -> torch.dtype | None:
        return self.k[0].dtype if self.k else None

    @property
    def is_fp8(self) -> bool:
        return self.dtype in FP8_DTYPES

    def k_scale(self, layer: int) -> float:
        return self.k_scales[layer] if self.k_scales else 1.0

    def v_scale(self, layer: int) -> float:
        return self.v_scales[layer] if self.v_scales else 1.0

    @classmethod
    def allocate(
        cls,
        info: ModelInfo,
        num_pages: int,
        page_size: int,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
        v_layout: str | None = None,
    ) -> KVPool:
        """Zeroed storage; `dtype` (default: the model's) may be an FP8 type (`kv_dtype`);
        `v_layout` a `V_LAYOUTS` name (`kv_layout` resolves `--kv-cache-layout`)."""
        shape = (num_pages, page_size, info.num_kv_heads, info.head_dim)
        dev = device or info.device
        dt = dtype or info.dtype
        layout = kv_layout(v_layout, dt)
        k = [zeros(shape, dt, dev) for _ in range(info.num_layers)]
        if layout == "hdp":
            hdp = (num_pages, info.num_kv_heads, info.head_dim, page_size)
            v = [zeros(hdp, dt, dev).permute(0, 3, 1, 2) for _ in range(info.num_layers)]
        else:
            v = [zeros(shape, dt, dev) for _ in range(info.num_layers)]
        return cls(k=k, v=v, page_size=page_size, v_layout=layout)

    def stored_values(self) -> list[torch.Tensor]:
        """Per layer, the value tensor in its memory order (contiguous): `v[layer]` itself in
        the `"nhd"` layout, `[num_pages, num_kv_heads, head_dim, page_size]` in `"hdp"`. Page
        `p` is index `p` of dimension 0 in both, so whole pages copy between pools of the
        same layout without a transpose."""
        if self.v_layout == "hdp":
            return [v.permute(0, 2, 3, 1) for v in self.v]
        return list(self.v)

    @staticmethod
    def bytes_per_token(info: ModelInfo, dtype: torch.dtype | None = None) -> int:
        elem = torch.tensor([], dtype=dtype or info.dtype).element_size()
        return 2 * info.num_layers * info.num_kv_heads * info.head_dim * elem


#: FP8 KV storage types; `--kv-cache-dtype fp8_e4m3` (SGLang/vLLM's name) selects e4m3.
FP8_DTYPES = (torch.float8_e4m3fn,)
KV_CACHE_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8": torch.float8_e4m3fn}


#: `KVPool.v_layout` values (`--kv-cache-layout`).
V_LAYOUTS = ("nhd", "hdp")


def kv_layout(name: str | None, dtype: torch.dtype) -> str:
    """The value layout for `--kv-cache-layout NAME` over a pool of `dtype`: `auto`/None is
    `"nhd"` (the engine resolves `auto` before a cache sees it, `EngineConfig.value_layout`:
    `"hdp"` for FP8 served by the triton backend on CUDA); `"hdp"` needs an FP8 pool."""
    layout = "nhd" if name in (None, "", "auto") else name
    if layout not in V_LAYOUTS:
        raise ValueError(
            f"kv cache layout {name!r} is not supported; choose auto or {', '.join(V_LAYOUTS)}"
        )
    if layout == "hdp" and dtype not in FP8_DTYPES:
        raise ValueError(
            f"--kv-cache-layout hdp stores FP8 values transposed per page; it needs "
            f"--kv-cache-dtype fp8_e4m3 (this pool is {dtype})"
        )
    return layout


def transpose_values(v: torch.Tensor) -> torch.Tensor:
    """A copy of a value tensor `[num_pages, page_size, num_kv_heads, head_dim]` in the
    `"hdp"` layout (same shape and values; each page stored `[heads, head_dim, page_size]`)."""
    return v.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)


def kv_dtype(name: str | None, model_dtype: torch.dtype) -> torch.dtype:
    """The KV pool's storage type for `--kv-cache-dtype NAME` (`auto`/None: the model's)."""
    if name in (None, "", "auto"):
        return model_dtype
    if name not in KV_CACHE_DTYPES:
        raise ValueError(
            f"kv cache dtype {name!r} is not supported; choose auto or {', '.join(KV_CACHE_DTYPES)}"
        )
    return KV_CACHE_DTYPES[name]


@dataclass
class ForwardBatch:
    """The flattened inputs of one model forward, built by the core after `allocate_kv`.

    Tokens of all scheduled requests are concatenated (`input_ids`, `positions`,
    `slot_mapping`: the flat KV slot `page * page_size + offset` each new token's K/V is written
    to). Per request: `query_lens` new tokens, `seq_lens` total tokens after this step (cached
    prefix + new), `page_tables` the pages covering `seq_lens`. Attention backends build their
    per-step metadata from this once, in `prepare`. CPU copies (`*_cpu` lists) are there so
    backends need not synchronise with the device to read them.
    """

    requests: list[Request]
    input_ids: torch.Tensor  # [num_tokens] int64
    positions: torch.Tensor  # [num_tokens] int64
    slot_mapping: torch.Tensor  # [num_tokens] int64
    query_lens_cpu: list[int]
    seq_lens_cpu: list[int]
    page_tables_cpu: list[list[int]]
    #: Index into the flat token dimension of each request's last token (where logits are taken).
    logits_indices: torch.Tensor  # [num_requests] int64
    #: Whether each request samples a token this step (False for a non-final prefill chunk).
    samples: list[bool] = field(default_factory=list)
    #: With speculative decoding: the flat rows whose logits `forward` returns (each drafting
    #: request's last token and its draft tokens, every other sampling request's last token),
    #: replacing the one row per sampling request of `logits_indices`. None otherwise.
    logits_rows: torch.Tensor | None = None
    #: With tree speculation: per request, None (causal) or a bool `[n, m]` CPU tensor (m >= n):
    #: row `i` says which of the request's last `m` keys its `i`-th of the last `n` query tokens
    #: may attend to (a draft tree's ancestors and itself; the `n` query tokens are the last `n`
    #: of those keys, the rest are cached; none sees a key after its own). Keys before those `m`
    #: stay visible to them. Only backends with `supports_tree_mask = True` get such a batch.
    #: None: every request is causal.
    tree_masks: list[torch.Tensor | None] | None = None
    #: `page_tables_cpu` as one zero-padded int32 numpy array `[num_requests, max pages]`,
    #: kept incrementally by the core (`pegboard.core.page_tables`); None: not provided.
    page_tables_array: Any = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_requests(self) -> int:
        # From the per-request lists the backends read, so a batch built without `Request`
        # objects (a tensor-parallel follower's, a kernel test's) still counts its requests.
        return len(self.query_lens_cpu)

    @property
    def is_decode_only(self) -> bool:
        return self.query_lens_cpu.count(1) == len(self.query_lens_cpu)  # one C pass


@dataclass
class Drafts:
    """The draft tokens a speculator proposes for one request (`propose` hook).

    - `tokens`: the guesses. For a chain (`parents is None`) token `i` follows token `i - 1`
      and token 0 follows the request's last token.
    - `parents`: for a tree, `parents[i]` is the index in `tokens` of token `i`'s parent, or -1
      for a child of the request's last token; a parent comes before its children. A node's
      first child is its best guess: the first path is what is verified where the attention
      backend has no tree mask.
    - `probs`: `[len(tokens), vocab]` float, row `i` the draft distribution token `i` was
      sampled from (rejection sampling accepts it with probability `min(1, p/q)`). None: the
      tokens were chosen deterministically (argmax, top-k, lookup): each row is a point mass.
      Sampled siblings must be independent draws (SpecInfer's multi-candidate rejection
      sampling is exact only then); deterministic siblings may be any distinct guesses.
    - `device_tokens`: a chain whose ids are still on the device (`Drafts.on_device`): a 1-D
      integer tensor of the `k` ids on the model's device, and `tokens` then holds
      `DEVICE_DRAFT` `k` times (the count is known on the host, the values are not). The core
      puts the ids into the verify forward's inputs on the device and reads them with the
      target's tokens after that forward: the host never waits for a drafting forward. The
      tensor must keep its values until the verify step ends (the next `propose` may reuse
      it). Ids outside the vocabulary are clamped for the forward, then reported as the
      speculator's fault, and none of that request's drafts is accepted in that step.
    """

    tokens: list[int]
    parents: list[int] | None = None
    probs: torch.Tensor | None = None
    device_tokens: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.tokens)

    @classmethod
    def on_device(cls, ids: torch.Tensor, probs: torch.Tensor | None = None) -> Drafts:
        """A chain of `ids.shape[0]` drafts whose ids stay on the device (`device_tokens`)."""
        return cls([DEVICE_DRAFT] * ids.shape[0], probs=probs, device_tokens=ids)

    def host_tokens(self) -> list[int]:
        """The draft ids on the host: `tokens`, or `device_tokens` read (a wait for the
        device; for tests and tools, never on the engine's step path)."""
        if self.device_tokens is None:
            return list(self.tokens)
        return self.device_tokens.tolist()


#: What `Drafts.tokens` holds for each draft whose id is only on the device (`device_tokens`),
#: and the placeholder a request's `token_ids` carries for it until the verify step.
DEVICE_DRAFT = -2


class SampleOutput:
    """What `sample` returns: one token per sampling request (in batch order), and logprobs
    where the request asked for them (`None` entries otherwise).

    `token_ids` may be given as a list of ints or as an integer tensor `[len(requests)]` on the
    logits' device. A tensor is preferred: the engine copies it to the host without blocking,
    so the CPU prepares the next step while the GPU still computes this one (overlap
    scheduling). Reading `token_ids` always gives a list (copying a tensor, which waits for
    the device); the engine reads `tokens` (the tensor, or None) instead.
    """

    def __init__(
        self, token_ids: list[int] | torch.Tensor, logprobs: list[TokenLogprobs | None]
    ) -> None:
        self.tokens: torch.Tensor | None = None
        self._ids: list[int] | None = None
        if isinstance(token_ids, torch.Tensor):
            self.tokens = token_ids
        else:
            self._ids = list(token_ids)
        self.logprobs = logprobs

    @property
    def token_ids(self) -> list[int]:
        if self._ids is None:
            self._ids = self.tokens.tolist()
        return self._ids

    def __len__(self) -> int:
        return len(self._ids) if self._ids is not None else int(self.tokens.shape[0])

    def __repr__(self) -> str:
        return f"SampleOutput(token_ids={self.token_ids!r}, logprobs={self.logprobs!r})"


@dataclass
class MetricsSnapshot:
    """What every `export_metrics` consumer receives.

    `kind` is "step" (after each engine step), "request" (when a request finishes; then
    `request` is set) or "transfer" (PD disaggregation: a request's KV transfer ended; then
    `transfer` is set, a `pegboard.sdk.transfer.KVTransferRecord`). Gauges describe the engine
    after the step.
    """

    kind: str
    timestamp: float
    num_running: int = 0
    num_waiting: int = 0
    batch_size: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preempted: int = 0
    kv_usage: float = 0.0
    step_time_s: float = 0.0
    hook_time_s: float = 0.0
    prefix_hit_tokens: int = 0
    prefix_query_tokens: int = 0
    request: Request | None = None
    extra: dict[str, float] = field(default_factory=dict)
    #: Errors (exceptions and contract violations) per (slot, plugin name) since start.
    plugin_errors: dict[tuple[str, str], int] = field(default_factory=dict)
    transfer: dict[str, Any] | None = None
