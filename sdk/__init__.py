"""pegboard.sdk — what third-party plugin authors import.

    from pegboard.sdk import hookimpl, Scheduler, SchedulePlan, ScheduledRequest

A plugin is a subclass of one slot base class (`Scheduler`, `KVCache`, `Attention`,
`Sampler`, `KVTransfer`, `MetricsExporter`), published under the entry-point group
`pegboard.plugins`. Method names equal to the slot's hook are hook implementations even
without `@hookimpl`; use `@hookimpl(wrapper=True)` to wrap another slot's hook.
"""

from pegboard.core.hookspecs import hookimpl
from pegboard.sdk.device import to_device
from pegboard.sdk.linear import LinearLayer, LinearMethod, LinearSpec, QuantizationConfig
from pegboard.sdk.patch import Patch, PatchError, requires
from pegboard.sdk.routing import RouteRequest, WorkerLoad, prompt_key
from pegboard.sdk.sampling import SampleRequests, SamplingBatch
from pegboard.sdk.slots import (
    SLOTS,
    Attention,
    AttentionBackend,
    KVCache,
    KVTransfer,
    MetricsExporter,
    NoOptions,
    Plugin,
    PluginContext,
    Router,
    Sampler,
    Scheduler,
    SlotSpec,
    Speculator,
)
from pegboard.sdk.types import (
    Drafts,
    FinishReason,
    ForwardBatch,
    KVPool,
    MetricsSnapshot,
    ModelInfo,
    Request,
    RequestStatus,
    SampleOutput,
    SamplingParams,
    ScheduledRequest,
    SchedulePlan,
    StepBudget,
    TokenLogprobs,
)

__all__ = [
    "LinearLayer",
    "LinearMethod",
    "LinearSpec",
    "QuantizationConfig",
    "SLOTS",
    "Attention",
    "AttentionBackend",
    "Drafts",
    "FinishReason",
    "ForwardBatch",
    "KVCache",
    "KVPool",
    "KVTransfer",
    "MetricsExporter",
    "MetricsSnapshot",
    "ModelInfo",
    "NoOptions",
    "Patch",
    "PatchError",
    "Plugin",
    "PluginContext",
    "Request",
    "RouteRequest",
    "Router",
    "WorkerLoad",
    "prompt_key",
    "RequestStatus",
    "SampleOutput",
    "SampleRequests",
    "SamplingBatch",
    "SamplingParams",
    "ScheduledRequest",
    "SchedulePlan",
    "Sampler",
    "Scheduler",
    "SlotSpec",
    "Speculator",
    "StandardSampler",
    "StepBudget",
    "TokenLogprobs",
    "hookimpl",
    "requires",
    "to_device",
]


def __getattr__(name: str):
    # `StandardSampler` (the default sampler, a base to extend: ban tokens, add a rule) lives
    # with the built-in plugins, which import the SDK: imported on first use to avoid a cycle.
    if name == "StandardSampler":
        from pegboard.plugins.sampling.standard import StandardSampler

        return StandardSampler
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
