"""The hook specifications: the one file a plugin author reads first.

Six verbs make up an engine step; each is a pluggy hook. A *single-choice* hook (`firstresult`)
has exactly one implementation registered at a time — selecting a plugin with a flag such as
`--scheduler sjf` registers that plugin's object, and swapping unregisters it. Other plugins may
still wrap a single-choice hook with `@hookimpl(wrapper=True)` (to time it, log it, or adjust its
result). `export_metrics` is a broadcast: every registered exporter receives every snapshot.

Hooks are called at step granularity (a pluggy call costs about 1.5 µs). Work that happens per
layer or per token goes through objects that a hook returned (the attention backend), never
through a hook call.

Lifecycle (options, setup with the predecessor's state, teardown) is not a hook: it lives on the
plugin object (`pegboard.sdk.Plugin`), because selection registers exactly that object and only
the selected object needs to be set up.

Implementations may declare any subset of a hook's arguments, by name (pluggy prunes the call),
so hooks can grow new arguments without breaking existing plugins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    import torch
    from pegboard.sdk.expert_placement import ExpertPlacement, ExpertTopology
    from pegboard.sdk.linear import LinearMethod, QuantizationConfig
    from pegboard.sdk.routing import RouteRequest, WorkerLoad
    from pegboard.sdk.slots import AttentionBackend, KVCache
    from pegboard.sdk.transfer import ByteRun
    from pegboard.sdk.types import (
        Drafts,
        KVPool,
        MetricsSnapshot,
        ModelInfo,
        Request,
        SampleOutput,
        SchedulePlan,
        StepBudget,
    )

PROJECT = "pegboard"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec(firstresult=True)
def schedule(
    waiting: list[Request], running: list[Request], budget: StepBudget, kv: KVCache
) -> SchedulePlan | None:
    """Pick the requests, and how many tokens of each, that run in this engine step.

    Called once per step, in the engine process, before `allocate_kv`.

    :param waiting: requests not holding KV, in arrival order (preempted requests are put back
        at the front). Do not mutate the list; the core moves requests between queues.
    :param running: requests holding KV pages, in the order they were admitted.
    :param budget: the token and request limits of this step.
    :param kv: the active KV cache, for queries only: `match_prefix`, `pages_needed`,
        `num_free_pages`. Allocation happens afterwards, in `allocate_kv`.

    :returns: a `SchedulePlan`. Every scheduled request must fit: the sum of `num_tokens` is at
        most `budget.max_batched_tokens`; at most `budget.max_running_requests` requests hold KV
        after the step; the pages needed by the scheduled requests fit in `num_free_pages` plus
        the pages of the requests listed in `plan.preempted`. A waiting request's `num_tokens`
        counts from the end of its cached prefix (`kv.match_prefix`). A running request may
        be given fewer tokens than it has uncomputed (chunked prefill) but at least one.
        An empty plan means "nothing can run now". Return `None` only to defer to another
        implementation (single-choice: there is none).

    The engine checks every plan before using it (`pegboard.core.contract`): token budget,
    request cap, no request scheduled twice or both scheduled and preempted, at least one and
    at most its uncomputed tokens per entry, the pages fit, every request taken from the queues
    given. A plan that breaks a rule, like an exception, is an error naming the plugin, its
    distribution and the rule, counted in `pegboard:plugin_errors_total{slot,plugin}`. Such a
    step schedules nothing and fails no request (a waiting request was never this scheduler's
    to lose); after 3 failing steps in a row the engine fails every queued request with the
    error, so a broken scheduler can neither spin the engine nor leave requests hanging.
    """


@hookspec(firstresult=True)
def allocate_kv(scheduled: list[Request], num_tokens: list[int]) -> list[Request] | None:
    """Give each scheduled request the KV pages for its next `num_tokens` tokens.

    Called once per step, in the engine process, right after `schedule` and after the core has
    freed the preempted requests' pages (through the active cache's `free`).

    For a request with `num_computed_tokens == 0` the cache first claims the prefix that
    `match_prefix` reported: it sets `num_computed_tokens` and `num_cached_tokens` to the hit
    length and puts the shared pages at the front of `page_table`. Then it appends pages to
    `request.page_table` until it covers `num_computed_tokens + n` tokens.

    :returns: the requests that could not be given their pages (they keep what they had; the
        core preempts them and runs the step without them); an empty list when all fit.
        Frees, prefix insertion and eviction go through the same plugin's companion methods
        (`free`, `commit`) — see `pegboard.sdk.KVCache`.
    """


@hookspec(firstresult=True)
def attention_kernel(model: ModelInfo, pool: KVPool) -> AttentionBackend | None:
    """Return the attention backend object the model's layers call directly.

    Called when the model runner is built, and again when the attention plugin is swapped or
    the KV pool is replaced (then captured CUDA graphs are rebuilt). Not called per step.

    :param model: head counts, head size, dtype and device of the loaded model.
    :param pool: the KV storage the backend reads and writes (`[pages, page_size, kv_heads,
        head_dim]` per layer, key and value).
    :returns: an object implementing `pegboard.sdk.AttentionBackend` (`prepare` once per step,
        `forward` once per layer).
    """


@hookspec(firstresult=True)
def transfer_kv(request: Request, peer: str, runs: list[ByteRun]) -> Any | None:
    """Start moving a request's KV pages from this (prefill) engine into a decode engine.

    Called once per request in prefill/decode-disaggregated mode (`--disaggregation-mode
    prefill`), in the prefill engine's process, on the step loop's thread, once the request's
    prefill finished and the decode engine registered its pages for it (the core's bootstrap).
    The pages stay allocated on both sides until the transfer ended.

    :param request: the request (its `page_table` names the source pages).
    :param peer: the decode engine, as named in the active plugin's `connect(peer, ...)`.
    :param runs: the copies to make, already merged: per layer, key then value, one
        `pegboard.sdk.transfer.ByteRun` (local address, peer address, bytes) per run of pages
        contiguous on both sides.
    :returns: a handle; the core polls the same plugin's `check(handle)` once per step until it
        returns True (done) or raises `KVTransferError` (the request fails, naming the peer).
        It must not block: the step loop keeps running other requests meanwhile.
    """


@hookspec(firstresult=True)
def sample(logits: torch.Tensor, requests: list[Request]) -> SampleOutput | None:
    """Turn logits into next tokens, one per request.

    Called once per step, in the engine process, after the forward pass, with the logits of
    the requests that produce a token this step (a non-final prefill chunk does not).

    :param logits: float32 `[len(requests), vocab_size]` on the model's device, raw model
        output (no temperature or penalty applied yet); in the model's dtype instead for a
        sampler whose class sets `logits_in_model_dtype = True` (see `Sampler`). The sampler may modify it in place
        (e.g. ban a token with `logits[:, t] = -inf`): the hook runs under
        `torch.inference_mode`, and the engine does not read the logits afterwards.
    :param requests: in the same order; their `params` (`SamplingParams`) and `token_ids`
        (for penalties) are what the sampler needs. Per-request sampler state (a seeded RNG)
        goes into `request.plugin_state`, so that a swapped-in sampler can pick it up.
        From the engine, `requests` is a `pegboard.sdk.SampleRequests` (a list) whose
        `sampling` attribute holds the same rows' `SamplingParams` as arrays (a `SamplingBatch`:
        temperature, top-k/p, min-p, penalties, logprobs count, seeds) gathered from tables
        the core fills once per request on arrival. Why: reading `params` request by request
        is a Python pass over the batch whenever it changes; a sampler that decides on the host
        which rows take which path, or wants the parameters as a device tensor, reads them
        there (`SamplingBatch.of(requests)` builds them from a plain list).
    :returns: a `SampleOutput` with one token id per request and, for requests whose
        `params.logprobs` is not None, the chosen token's logprob and the top alternatives
        taken from the raw logits' log-softmax. Give the token ids as an integer tensor on the
        logits' device rather than a list where you can: a list (`.tolist()`) makes the host
        wait for the GPU, which defeats overlap scheduling (the engine prepares the next step
        while this one's tokens are still being computed, and reads them one step later).

    With overlap scheduling, a request's previous token may still be on its way to the host
    when `sample` is called for the step after: the engine resolves it first, so
    `requests[i].token_ids` is always complete here (penalties see every token).

    The engine checks the output (`pegboard.core.contract`): a `SampleOutput`, one token per
    request, an integer dtype, a 1-D `[len(requests)]` tensor, ids in `[0, vocab_size)` (for a
    device tensor: when the ids reach the host, one step later). A violation or an exception
    fails the requests of this call only, with an error naming the plugin and the rule.
    """


@hookspec(firstresult=True)
def propose(requests: list[Request], max_tokens: list[int]) -> list[Drafts] | None:
    """Guess the next few tokens of each decoding request (speculative decoding).

    Why a hook: a decode step reads all the weights to produce one token per request; if a
    cheap guesser (n-gram lookup in the request's own context, a small draft model, an EAGLE
    head) proposes k tokens, the target checks all of them in one forward and keeps the ones
    it agrees with, so a step yields up to k + 1 tokens. How to guess is the part users swap;
    checking and rolling back are the core's (`pegboard.core.speculative`), so a speculator
    can make decoding slower but never different.

    Called once per step, in the engine process, after `schedule` and before `allocate_kv`,
    with the scheduled requests that decode this step (prefill chunks are not included; nor
    are requests with penalties, whose sampler state depends on every earlier token). Not
    called in steps the core runs without drafts (a large batch, low recent acceptance:
    `pegboard.core.speculative.switch`): a speculator must not assume it sees every step.

    :param requests: their `token_ids` are complete (no placeholder).
    :param max_tokens: per request, the most draft tokens the core will verify this step
        (bounded by the step's token budget, the free KV pages, `max_tokens` and the context
        length); 0 means "propose nothing".
    :returns: one `pegboard.sdk.types.Drafts` per request, in order: a chain, or a tree with
        parent indices (each parent before its children, the best guess as a node's first
        child: a backend without a tree mask verifies only the first path). A chain may
        leave its ids on the device (`Drafts.on_device(ids)`: `ids` a 1-D integer tensor on
        the model's device, `tokens` then `DEVICE_DRAFT` once per id, so the count is known
        on the host): the core writes them into the verify forward's input ids on the device
        and reads them once, with the target's tokens, after that forward, so the host never
        waits for the drafting; the tensor must hold its values until the verify step ends
        (the next `propose` may overwrite it). The core checks the result
        (`pegboard.core.speculative.check_drafts`): one entry per request, at most
        `max_tokens[i]` tokens, ids in the vocabulary, valid parent indices; for device ids
        their form here and their range after the verify forward (the forward runs on ids
        clamped into the vocabulary). A violation or an exception is an error naming the
        plugin, counted like other plugin errors; that step runs without drafts (device ids
        out of range: that request accepts none of its drafts in that step) and no request
        fails.
    """


@hookspec
def export_metrics(snapshot: MetricsSnapshot) -> None:
    """Receive a metrics snapshot (broadcast: every registered exporter gets every snapshot).

    Called in the engine process after every step (`snapshot.kind == "step"`) and when a
    request finishes (`"request"`, with `snapshot.request` set). Runs on the step loop's
    thread: an exporter must return quickly (buffer, or hand off to its own thread).
    Exceptions are caught and counted per exporter (`pegboard:plugin_errors_total{slot=
    "metrics",plugin=...}`, `GET /admin/plugins`); the first is logged with its traceback. They
    never fail a request, and the other exporters still receive the snapshot.
    """


@hookspec(firstresult=True)
def route(request: RouteRequest, workers: list[WorkerLoad]) -> str | None:
    """Pick the worker (engine replica) an incoming HTTP request goes to.

    Why a hook: with several replicas behind one address (`pegboard serve --dp-size N`, or
    `pegboard router --worker URL ...` in front of any OpenAI-compatible servers), where a
    request runs decides its prefix-cache hits and its queueing delay; that choice is a policy
    users swap (round robin, least load, cache aware) like a scheduling policy.

    Called once per request, in the router process (never in an engine), on its event loop:
    it must not block. Called again for the same request, without the worker it failed on,
    when that worker could not take it (connection refused, died before the first byte).

    :param request: the endpoint, the routing key (`text`: prompt, chat contents, or token ids
        one character each) and the parsed body — both parsed when first read, so a policy
        that reads neither adds no JSON parsing to the request path.
    :param workers: the healthy workers the request may go to (never empty), each with the
        router's count of its open requests and the load the worker last reported.
    :returns: the `url` of one of `workers`. Any other value is reported as an error naming
        the plugin. Return `None` only to defer to another implementation (single-choice:
        there is none).
    """


@hookspec(firstresult=True)
def linear_kernel(model: ModelInfo, quantization: QuantizationConfig | None) -> LinearMethod | None:
    """Return the `LinearMethod` that builds the model's projections (weights + matmul).

    Why a hook: how a projection's weights are stored and multiplied (dense bf16, 4-bit packed
    for W4A16 kernels, FP8, ...) decides a decode step's cost, which is reading the weights;
    such kernels and their checkpoint formats (GPTQ, AWQ, compressed-tensors, GGUF) are what
    users add without forking the engine. It cannot go through `attention_kernel`: it shapes
    the model's own parameters, so it must be decided before the weights are read.

    Called once, in the engine process, while the model is built — before its weights are read
    and before any other slot is set up — never per step: the model calls each returned layer
    directly (`pegboard.sdk.linear`). The slot cannot be swapped at runtime (the weights were
    read through it); restart with another `--linear`.

    :param model: the model being built (head counts, sizes, dtype and device).
    :param quantization: the checkpoint's weight quantization (`config.json`'s
        `quantization_config`, or `--quantization`), None for an unquantized checkpoint.
    :returns: a `pegboard.sdk.linear.LinearMethod`; `create(spec)` is called once per
        projection (`LinearSpec`: name, sizes, stacked shards, bias, dtype, device, tensor-
        parallel partition) and must return a `LinearLayer`. Raise
        `pegboard.sdk.linear.QuantizationError` naming the layer or tensor for a checkpoint the
        plugin cannot serve; the engine reports it, naming the plugin, before serving starts.
    """


@hookspec(firstresult=True)
def place_experts(load: torch.Tensor, topology: ExpertTopology) -> ExpertPlacement | None:
    """Return where each mixture-of-experts expert lives: an `ExpertPlacement`.

    Why a hook: with expert parallelism a rank is as slow as its busiest experts, and which
    experts are busy depends on the traffic. Placing hot experts apart and replicating them into
    redundant slots (DeepSeek's EPLB) evens the ranks out; how to do it — a static layout, EPLB,
    a placement tuned for one workload or one network — is policy users want to change without
    forking the engine. It is not a per-layer call: the MoE layers route by the returned object.

    Called at step boundaries in the engine process: once when the engine starts (load all
    zeros) and then every `--eplb-rebalance-num-iterations` steps with the expert load recorded
    since (`--expert-distribution-recorder-mode`). The engine checks the answer, moves the
    expert weights between steps, and no in-flight request's output changes.

    :param load: `[num_layers, num_logical]` float64 tokens routed to each logical expert of
        each sparse layer (CPU).
    :param topology: layers, logical and physical expert counts, EP ranks, nodes and groups
        (`pegboard.sdk.expert_placement.ExpertTopology`).
    :returns: an `ExpertPlacement` of shape `[num_layers, num_physical]` in which every
        logical expert has at least one slot; anything else is reported naming the plugin and
        the current placement is kept.
    """
