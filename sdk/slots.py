"""One short base class per slot. Their docstrings are the contract a plugin author codes against;
`pegboard.sdk.testing` checks exactly these sentences.

A plugin is a class. The engine instantiates it with its validated options (`Options`, a pydantic
model), calls `setup`, and registers the instance with the plugin manager: its `@hookimpl`
methods then answer the slot's hook. Swapping unregisters it and calls `close`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pydantic
import torch
from pegboard.core.hookspecs import hookimpl

if TYPE_CHECKING:
    from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology
    from pegboard.sdk.linear import LinearMethod, QuantizationConfig
    from pegboard.sdk.routing import RouteRequest, WorkerLoad
    from pegboard.sdk.transfer import ByteRun
    from pegboard.sdk.types import (
        Drafts,
        ForwardBatch,
        KVPool,
        MetricsSnapshot,
        ModelInfo,
        Request,
        SampleOutput,
        SchedulePlan,
        StepBudget,
    )


class NoOptions(pydantic.BaseModel):
    """The options model of a plugin that takes none."""

    model_config = pydantic.ConfigDict(extra="forbid")


@dataclass
class PluginContext:
    """What the engine tells a plugin at `setup`.

    `model` is None for plugins set up before a model is loaded (e.g. listing). `engine` holds
    engine-wide settings a plugin may size itself by (`page_size`, `kv_cache_tokens`,
    `gpu_memory_utilization`, `kv_memory_bytes` — the bytes the core set aside for KV).
    """

    model: ModelInfo | None = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    engine: dict[str, Any] = field(default_factory=dict)


class Plugin:
    """Base of every plugin.

    Class attributes:
    - `slot`: which slot the plugin fills (set by the slot base class).
    - `name`: the name users select it by; defaults to the entry point's name.
    - `Options`: a pydantic model of the plugin's options. Field names become CLI flags
      `--<name>-<field>` and the admin API validates swaps with the same model. Unknown
      fields are rejected.
    - `handoff`: what a runtime swap does with in-flight requests. `"state"`: the successor's
      `setup` receives this instance as `previous` and takes over its state, nothing waits.
      `"drain"`: the engine stops admitting requests, lets the running ones finish, then swaps.
    """

    slot: ClassVar[str] = ""
    name: ClassVar[str] = ""
    Options: ClassVar[type[pydantic.BaseModel]] = NoOptions
    handoff: ClassVar[Literal["state", "drain"]] = "state"

    def __init__(self, options: pydantic.BaseModel | None = None) -> None:
        self.options = options if options is not None else self.Options()

    @classmethod
    def unavailable(cls) -> str | None:
        """Why this plugin cannot run on this machine (a missing package, no CUDA device), or
        None. `pegboard plugins` shows the reason; it must be cheap (no kernel builds)."""
        return None

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        """Prepare to serve. `previous` is the plugin this one replaces in a runtime swap
        (handoff `"state"`), or None. Raising here aborts the swap and keeps `previous` active."""

    def close(self) -> None:
        """Release resources; called after the plugin was unregistered."""


class Scheduler(Plugin):
    """Slot `scheduler` — answers the `schedule` hook (see its docstring for the plan's rules).

    A scheduler owns no requests: the engine owns the waiting and running queues and passes
    them in every step, so swapping schedulers never loses a request. Per-request policy data
    may live in `request.plugin_state[self.name]`.
    """

    slot = "scheduler"

    @hookimpl
    def schedule(
        self, waiting: list[Request], running: list[Request], budget: StepBudget, kv: KVCache
    ) -> SchedulePlan:
        raise NotImplementedError


class KVCache(Plugin):
    """Slot `kv_cache` — owns the KV pool and which pages hold which request's tokens.

    Invariants the conformance kit checks after every operation: a page is either free or
    referenced (by a request's `page_table` or a cache structure), never both, never lost;
    `free` of a request returns all its pages not kept for reuse; `num_free_pages` counts pages
    an allocation could obtain now (free plus evictable).

    - `setup` creates `self.pool` (a `KVPool`) sized from `ctx.engine` (`kv_cache_tokens`, or
      `kv_memory_bytes`) and `self.page_size`; with a `previous` cache of the same page size
      it may adopt its pool and allocations (handoff "state").
    - `match_prefix(request)` — query only: how many leading tokens of `request.token_ids`
      are already cached (0 for a cache without prefix reuse). Never the whole sequence: at
      least one token is left to compute so there are logits to sample from.
    - `pages_needed(request, n)` — pages to add so the request can hold `n` more tokens
      (counting from `num_computed_tokens`, or from the prefix hit for a waiting request).
    - `allocate_kv` (the hook) — grows page tables; see the hookspec.
    - `commit(requests)` — after a forward pass: the requests' `num_computed_tokens` grew;
      a prefix cache may insert their now-full pages.
    - `free(request)` — the request finished, was aborted or preempted: release its pages
      (a prefix cache may keep them as reusable) and clear `page_table`. Idempotent.
    """

    slot = "kv_cache"
    pool: KVPool
    page_size: int = 16

    def match_prefix(self, request: Request) -> int:
        return 0

    def pages_needed(self, request: Request, num_new_tokens: int) -> int:
        raise NotImplementedError

    @property
    def num_free_pages(self) -> int:
        raise NotImplementedError

    @property
    def num_pages(self) -> int:
        return self.pool.num_pages

    @hookimpl
    def allocate_kv(self, scheduled: list[Request], num_tokens: list[int]) -> list[Request]:
        raise NotImplementedError

    def commit(self, requests: list[Request]) -> None:
        """Default: nothing to insert."""

    def free(self, request: Request) -> None:
        raise NotImplementedError

    def usage(self) -> float:
        """Fraction of pages not free, in [0, 1]."""
        return 1.0 - self.num_free_pages / max(self.num_pages, 1)

    def stats(self) -> dict[str, float]:
        """Counters for metrics, e.g. `prefix_hit_tokens`, `prefix_query_tokens`."""
        return {}


class AttentionBackend:
    """The object `attention_kernel` returns; model layers call it directly.

    - `prepare(batch)` — once per step, before the forward pass: build whatever per-step
      metadata the kernels need from the `ForwardBatch` (plan, index tensors).
    - `forward(layer, q, k, v)` — once per layer: `q` is `[num_tokens, num_heads, head_dim]`,
      `k`, `v` are `[num_tokens, num_kv_heads, head_dim]` for the step's new tokens. Write
      `k`, `v` into the pool at `batch.slot_mapping`, then return causal attention of each new
      token over its request's cached prefix and the new tokens up to itself,
      `[num_tokens, num_heads, head_dim]`, scaled by `scale` (1/sqrt(head_dim) by default).
      `q`, `k` and `v` may be strided views (slices of the fused qkv projection's output):
      each head's `head_dim` values are contiguous, but rows are not; a kernel that needs
      contiguous inputs must copy them (`.contiguous()`).

    CUDA graphs (optional; the core replays decode steps as graphs only for a backend whose
    class sets `supports_cuda_graph = True`). Such a backend promises:

    - `prepare_for_capture(max_requests)` — called once, before any capture: size every tensor
      `forward` reads for batches of up to `max_requests` requests. From then on `prepare`
      refills those tensors in place and never replaces them, for any batch of at most
      `max_requests` requests, decode or not (captured graphs keep their addresses).
    - A decode-only batch's `forward` (every request has one new token) never synchronises
      with the host and stays correct when replayed from a capture made after `prepare` of
      another batch of as many rows: it reads per-request lengths and pages from its device
      tensors, and whatever it fixes at launch (grid, split count) must suit any such batch.
    - `forward` may get more token rows than `prepare`'s batch had requests (the batch padded
      to a captured size): rows past the last request have slot -1, store no K/V, and their
      outputs are ignored; they must not change any real row's output.

    Verify graphs (speculative decoding; only for a class that also sets
    `supports_cuda_graph_verify = True`): `prepare_for_capture(max_requests, max_query_len)`
    also sizes what a batch of up to `max_requests` requests with up to `max_query_len` new
    tokens each needs. A batch whose requests all have the same number `q` of new tokens
    (no tree masks) then never synchronises with the host in `forward`, and replays correctly
    from a capture made after `prepare` of another batch with as many requests and the same
    `q`. Some of its rows have slot -1 (padding): they store nothing, and the backend may let
    them attend to whatever the page table shows past a request's real keys.

    Mixed graphs (prefill tokens beside decodes, captured per token count; only for a class
    that also sets `supports_cuda_graph_mixed = True`): `prepare_for_mixed_capture(max_tokens)`
    is called once, after `prepare_for_capture`. Then `prepare_mixed(batch)` gets a batch laid
    out in `batch.num_tokens` rows (at most `max_tokens`): its requests' new tokens in the
    first rows as usual, the rest padding (slot -1, belonging to no request). Its `forward`
    never synchronises with the host, stores nothing for padding rows, gives the real rows
    the outputs `prepare` of the unpadded batch would, and replays correctly from a capture
    made after `prepare_mixed` of any other batch with as many rows.

    Tree verify graphs (a class that also sets `supports_cuda_graph_tree_verify = True`):
    `prepare_for_capture(max_requests, max_query_len, max_tree)` also fixes the tensors
    holding `ForwardBatch.tree_masks` of up to `[max_tree, max_tree]` per request; `prepare`
    writes any batch's masks (a list, possibly all None) into them, so a replay of a capture
    made with other masks applies this batch's.

    Fused KV store (optional; a class that sets `supports_fused_kv_store = True`): the model
    may write the step's new keys and values into the pool itself, in the kernel that applies
    rope (one launch fewer per layer, `core/kernels/rotary_store.py`). `kv_store_target(layer)`
    returns `(k_cache, v_cache, slot_mapping, k_scale, v_scale)`: the layer's caches in the
    layout `[num_pages, page_size, num_kv_heads, head_dim]`, the step's slots
    (`page * page_size + offset`, negative for padding rows) and the FP8 scales (1.0 for a
    16-bit pool), or None when this step cannot take it (then the model calls `forward`).
    After writing there, the model calls `attend(layer, q)` instead of `forward`: what
    `forward` returns, without storing anything.
    """

    #: Whether decode steps may be captured and replayed as CUDA graphs (see above).
    supports_cuda_graph: ClassVar[bool] = False
    #: Whether speculative verify steps may be captured too (see above).
    supports_cuda_graph_verify: ClassVar[bool] = False
    #: Whether mixed steps may be captured per token count too (see above).
    supports_cuda_graph_mixed: ClassVar[bool] = False
    #: Whether verify steps with draft trees may be captured too (see above).
    supports_cuda_graph_tree_verify: ClassVar[bool] = False
    #: Whether the model may store the step's K/V itself (`kv_store_target`, `attend`).
    supports_fused_kv_store: ClassVar[bool] = False
    #: The precision K/V are stored at when lower than the model's (e.g. an fp8 KV cache):
    #: the conformance kit then compares within that dtype's rounding. None: stored exactly.
    kv_dtype: ClassVar[torch.dtype | None] = None
    #: The value layouts (`KVPool.v_layout`) the backend reads and writes; the core refuses,
    #: before serving, a pool stored otherwise (`--kv-cache-layout`).
    v_layouts: ClassVar[tuple[str, ...]] = ("nhd",)

    def __init__(self, model: ModelInfo, pool: KVPool, scale: float | None = None) -> None:
        self.model = model
        self.pool = pool
        self.scale = scale if scale is not None else model.head_dim**-0.5

    def prepare_for_capture(
        self, max_requests: int, max_query_len: int = 1, max_tree: int = 0
    ) -> None:
        """Size the metadata for CUDA graph capture (see the class docstring; `max_query_len`
        > 1 only with `supports_cuda_graph_verify`, `max_tree` > 0 only with
        `supports_cuda_graph_tree_verify`). Default: nothing to size, for backends without
        CUDA graph support."""

    def prepare_for_mixed_capture(self, max_tokens: int) -> None:
        """Size what mixed graphs of up to `max_tokens` rows need (see the class docstring;
        only with `supports_cuda_graph_mixed`)."""
        raise NotImplementedError(f"{type(self).__name__} has no mixed-step CUDA graphs")

    def prepare_mixed(self, batch: ForwardBatch) -> None:
        """`prepare` for a batch padded to a mixed graph's rows (see the class docstring)."""
        raise NotImplementedError(f"{type(self).__name__} has no mixed-step CUDA graphs")

    def prepare(self, batch: ForwardBatch) -> None:
        raise NotImplementedError

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        raise NotImplementedError

    def kv_store_target(self, layer: int) -> KVStoreTarget | None:
        """Where the model may write this step's K/V itself (see the class docstring; only
        with `supports_fused_kv_store`). Default: nowhere."""
        return None

    def attend(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """`forward` after the model stored the step's K/V at `kv_store_target(layer)`."""
        raise NotImplementedError(f"{type(self).__name__} has no fused KV store")


#: `(k_cache, v_cache, slot_mapping, k_scale, v_scale)`: `AttentionBackend.kv_store_target`.
KVStoreTarget = tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, float]


class Attention(Plugin):
    """Slot `attention` — answers `attention_kernel` with an `AttentionBackend`.

    The backend must give the same results as the reference `torch` backend within the
    tolerance of its dtype (the conformance kit compares them)."""

    slot = "attention"

    @hookimpl
    def attention_kernel(self, model: ModelInfo, pool: KVPool) -> AttentionBackend:
        raise NotImplementedError


class Sampler(Plugin):
    """Slot `sampler` — answers `sample` (see its docstring).

    Must honour every `SamplingParams` field that concerns token choice: greedy when
    temperature is 0, the filters (top-k, top-p, min-p) never emit an excluded token, penalties,
    per-request seeds reproducible regardless of batch composition, and logprobs from the raw
    logits. Stopping (EOS, stop ids/strings, max_tokens) is the core's.

    `logits_in_model_dtype = True`: the sampler takes the logits in the model's dtype (bfloat16
    or float16 on a GPU) instead of float32, and gives the same tokens and logprobs as it would
    from their float32 conversion (which is exact: convert rows where arithmetic needs it, e.g.
    `logits.float().log_softmax(-1)`). The engine then skips a `[rows, vocab]` float32 copy of
    every step's logits (114 µs a step for 256 rows of Qwen3-0.6B on the H200). The conformance
    kit checks the promise (`check_sampler`)."""

    slot = "sampler"
    logits_in_model_dtype: ClassVar[bool] = False

    @hookimpl
    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
        raise NotImplementedError

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """Called by the engine once the model is loaded (and when this sampler is swapped
        in), before any `sample`: launch once each JIT-compiled kernel sampling will run, for
        logits `[rows, vocab_size]` of `dtype` on `device` (the dtype `sample` receives), so
        that no step pays a compile (docs/kernels.md, "Triton specializations"). Default:
        nothing to warm."""


class KVTransfer(Plugin):
    """Slot `transfer` — the data side of prefill/decode disaggregation: moves a request's KV
    pages from a prefill engine's pool into a decode engine's pool (host memory on CPU, device
    memory on GPUs) through a transfer library. Bootstrap, heartbeats, timeouts and page
    bookkeeping are the core's (`pegboard.sdk.transfer` explains the split and the states).

    - `register_pool(pool)` — once, after `setup`: make the pool's memory reachable by peers
      and return this engine's descriptor, a string a peer passes to `connect` (an address,
      agent metadata). The pool stays allocated and unmoved while the plugin is active.
    - `connect(peer, descriptor)` — on the prefill side, when a decode engine named `peer`
      introduced itself: prepare to write into its pool. Raise `KVTransferError` naming the
      peer if it cannot be reached or its memory not used.
    - `transfer_kv(request, peer, runs)` — the hook: start copying every `ByteRun` (local
      `src` address to the peer's `dst` address) without blocking the step loop, and return a
      handle. The runs are already merged (per layer, key and value, runs of contiguous pages).
    - `check(handle)` — True once every byte of the handle is in the peer's memory, False while
      in flight; raises `KVTransferError` naming the peer when the copy failed. Polled once per
      engine step; after it returned True or raised, the handle is not used again.
    - `disconnect(peer)` — the peer left (it closed or missed its heartbeats): drop its state.

    Not swappable while requests are in flight (handoff "drain").
    """

    slot = "transfer"
    handoff = "drain"

    def register_pool(self, pool: KVPool) -> str:
        raise NotImplementedError

    def connect(self, peer: str, descriptor: str) -> None:
        raise NotImplementedError

    def disconnect(self, peer: str) -> None:
        """Default: nothing is kept per peer."""

    @hookimpl
    def transfer_kv(self, request: Request, peer: str, runs: list[ByteRun]) -> Any:
        raise NotImplementedError

    def check(self, handle: Any) -> bool:
        raise NotImplementedError


class LinearKernel(Plugin):
    """Slot `linear` — answers `linear_kernel` with a `pegboard.sdk.linear.LinearMethod` that
    builds every projection of the model (weight storage, checkpoint loading, matmul).

    - `formats`: the `quantization_config.quant_method` values (`gptq`, `awq`,
      `compressed-tensors`, `gguf`) whose checkpoints it reads; empty for dense weights. The
      loader picks a plugin listing the checkpoint's method when the user names none.
    - Each layer's `forward(x)` equals `x @ W.T + b` of the de-quantized weights, within
      the tolerance of the activation dtype (the conformance kit compares them).
    - Not swappable at runtime: `setup` with a `previous` plugin raises.
    """

    slot = "linear"
    formats: ClassVar[tuple[str, ...]] = ()

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        if previous is not None:
            raise RuntimeError(
                "the linear slot cannot be swapped at runtime (the weights were read through "
                "it); restart the engine with --linear"
            )

    @hookimpl
    def linear_kernel(
        self, model: ModelInfo, quantization: QuantizationConfig | None
    ) -> LinearMethod:
        raise NotImplementedError


class Speculator(Plugin):
    """Slot `speculator` — answers `propose` (see its docstring) with draft tokens.

    - `propose(requests, max_tokens)` returns one `Drafts` per request, in order, with at most
      `max_tokens[i]` tokens for request `i` (fewer or none is always allowed), each an id of
      the target's vocabulary; a chain, or a tree (`Drafts.parents`, each parent before its
      children; siblings with `probs` must be drawn independently from their rows). The core
      verifies a tree in one forward where the attention backend has a tree mask
      (`supports_tree_mask`), else only its first path (each node's first child). A chain
      drafted on the device may stay there: `Drafts.on_device(ids)` (a 1-D integer tensor on
      the model's device, unchanged until the verify step ends); the core fills the verify
      forward's inputs from it and reads it after that forward (one wait per step, not two).
    - Per-request state (a draft model's KV) goes into `request.plugin_state[self.name]`, so
      it is dropped with the request. Between two calls a request's `token_ids` may have grown
      by several tokens (accepted drafts) or been cut back (a stop string): compare with what
      was seen last time instead of assuming one new token.
    - `check_target(config, options)` — class method, called before any model loads, with the
      target's `config.json` as a dict: raise `ValueError` when this speculator cannot serve
      that target (a draft whose vocabulary or hidden size differs). Default: no check.

    A speculator only guesses: the core verifies and rolls back, so a bad guess costs speed,
    never correctness. Handoff "state": drafts live one step, a swap loses nothing.
    """

    slot = "speculator"

    @classmethod
    def check_target(cls, config: dict, options: pydantic.BaseModel) -> None:
        """Default: any target will do."""

    def chain_length(self) -> int | None:
        """The most tokens a chain from this speculator has, or None (unknown, or it drafts
        trees). The core captures CUDA graphs for verify steps of `chain_length() + 1` tokens
        per request (longer steps run eagerly), and asks no request for more (`propose`'s
        `max_tokens`), so a step's token budget is shared by all its requests. Default: the
        options' `num_draft_tokens` unless their `topk` asks for trees."""
        k = getattr(self.options, "num_draft_tokens", None)
        if not isinstance(k, int) or k < 1 or getattr(self.options, "topk", 1) > 1:
            return None
        return k

    def tree_size(self) -> int | None:
        """The most tokens a tree from this speculator has, or None (unknown, or it drafts
        chains). The core captures CUDA graphs for tree verify steps of `tree_size() + 1`
        tokens per request (larger trees run eagerly), and asks no request for more. With
        neither known, a request may be asked for all the tokens it has left. Default: the
        options' `num_draft_tokens` when their `topk` asks for trees."""
        k = getattr(self.options, "num_draft_tokens", None)
        if not isinstance(k, int) or k < 1 or getattr(self.options, "topk", 1) <= 1:
            return None
        return k

    @hookimpl
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        raise NotImplementedError


class MetricsExporter(Plugin):
    """Slot `metrics` (many may be active) — receives every `export_metrics` snapshot.

    Must return quickly; must not keep references to `snapshot.request` beyond the call."""

    slot = "metrics"

    @hookimpl
    def export_metrics(self, snapshot: MetricsSnapshot) -> None:
        raise NotImplementedError


class Router(Plugin):
    """Slot `router` — answers `route` in the router process (`pegboard router`, `pegboard
    serve --dp-size N`), never inside an engine.

    - `route(request, workers)` returns the `url` of one of `workers` (the healthy workers
      this request has not failed on; never empty). Anything else is an error the router
      reports naming the plugin. It must not block: it runs on the router's event loop.
    - `remove_worker(url)` — the worker left the pool (it died or failed its health checks):
      drop what the policy keeps about it. It may come back later, empty.
    - `stats()` — counters the router exports on its `/metrics` (e.g. `cache_hit_chars` and
      `cache_query_chars` of a cache-aware policy, for its hit estimate).
    """

    slot = "router"

    @hookimpl
    def route(self, request: RouteRequest, workers: list[WorkerLoad]) -> str:
        raise NotImplementedError

    def remove_worker(self, url: str) -> None:
        """Default: the policy keeps nothing per worker."""

    def stats(self) -> dict[str, float]:
        return {}


class ExpertPlacer(Plugin):
    """Slot `expert_placement` — answers `place_experts` with an
    `pegboard.sdk.expert_placement.ExpertPlacement` for a mixture-of-experts model.

    - `place_experts(load, topology)` gets the recorded logical expert load `[L, E]` (float64
      token counts on the CPU; zeros before any traffic) and returns a placement of shape
      `[topology.num_layers, topology.num_physical]` in which every logical expert has at
      least one slot. The core checks it (`ExpertPlacement.problems`) and keeps the current
      placement, naming the plugin, when it is invalid.
    - Called at step boundaries only: once at start and every
      `--eplb-rebalance-num-iterations` steps; never per token or per layer.
    - Placement changes where expert weights live, never a result: replicas are copies.
    """

    slot = "expert_placement"

    @hookimpl
    def place_experts(self, load: torch.Tensor, topology: ExpertTopology) -> ExpertPlacement:
        raise NotImplementedError


@dataclass(frozen=True)
class SlotSpec:
    """A slot: its hook, the base class its plugins derive from, whether several may be
    active at once, the plugin selected when the user names none, and the process its hook
    runs in (`"engine"`: selected by every engine; `"router"`: only by the router; `"model"`:
    selected by the model loader, before the engine's other slots)."""

    name: str
    hook: str
    base: type[Plugin]
    multi: bool = False
    default: str | None = None
    flag: str = ""
    process: Literal["engine", "router", "model"] = "engine"


SLOTS: dict[str, SlotSpec] = {
    s.name: s
    for s in [
        SlotSpec("scheduler", "schedule", Scheduler, default="fcfs", flag="--scheduler"),
        SlotSpec("kv_cache", "allocate_kv", KVCache, default="paged", flag="--kv-cache"),
        SlotSpec("attention", "attention_kernel", Attention, default="torch", flag="--attention"),
        SlotSpec("sampler", "sample", Sampler, default="standard", flag="--sampler"),
        SlotSpec("transfer", "transfer_kv", KVTransfer, default=None, flag="--transfer"),
        SlotSpec("speculator", "propose", Speculator, default=None, flag="--speculator"),
        SlotSpec("metrics", "export_metrics", MetricsExporter, multi=True, flag="--metrics"),
        SlotSpec(
            "router",
            "route",
            Router,
            default="round_robin",
            flag="--router-policy",
            process="router",
        ),
        SlotSpec(
            "linear",
            "linear_kernel",
            LinearKernel,
            default="bf16",
            flag="--linear",
            process="model",
        ),
        SlotSpec(
            "expert_placement",
            "place_experts",
            ExpertPlacer,
            default="static",
            flag="--expert-placement",
        ),
    ]
}
