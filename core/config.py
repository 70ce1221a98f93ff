"""Engine settings: what `LLM(...)` keyword arguments and `pegboard serve` flags configure."""

from __future__ import annotations

from typing import Any, Literal

import pydantic


class EngineConfig(pydantic.BaseModel):
    """Engine-wide settings. Plugin selections name a plugin per slot; `plugin_options` holds each
    selected plugin's options (validated by that plugin's own `Options` model)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    model: str | None = None  # a local HF directory; None: the bundled default model
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    quantization: str | None = None  # gptq | awq | compressed-tensors | gguf; None: config.json
    kv_cache_dtype: str = "auto"  # auto (the model dtype) | fp8_e4m3
    # auto | nhd | hdp (FP8 values transposed per page for the e4m3 tensor-core decode)
    kv_cache_layout: Literal["auto", "nhd", "hdp"] = "auto"
    kv_cache_scales: str | None = None  # JSON of per-layer FP8 K/V scales (bench_kv_fp8.py)
    load_format: str = "auto"  # auto: the checkpoint's weights; dummy: random weights
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0

    # Slots (None: the slot's default plugin).
    scheduler: str | None = None
    kv_cache: str | None = None
    attention: str | None = None
    sampler: str | None = None
    transfer: str | None = None
    speculator: str | None = None  # None: no speculative decoding
    # Steps without drafts (core/speculative/switch.py): batches this large, low acceptance,
    # slower than plain decoding (min_speedup None: 1.0 on CUDA, off elsewhere; 0: off).
    speculative_disable_by_batch_size: int | None = pydantic.Field(None, ge=1)
    speculative_min_accept_rate: float = pydantic.Field(0.2, ge=0.0, le=1.0)
    speculative_min_speedup: float | None = pydantic.Field(None, ge=0.0)
    linear: str | None = None  # None: w4a16 for a quantized checkpoint, else bf16
    expert_placement: str | None = None  # MoE models; None: static (--enable-eplb: eplb)
    metrics: list[str] = pydantic.Field(default_factory=list)
    plugin_options: dict[str, dict[str, Any]] = pydantic.Field(default_factory=dict)
    patches: list[str] = pydantic.Field(default_factory=list)
    strict_patches: bool = False

    # Scheduling budget.
    # Tokens per step (the chunked-prefill budget); 8192 as SGLang's chunked prefill on H100.
    max_num_batched_tokens: int = pydantic.Field(8192, ge=1)
    max_running_requests: int = pydantic.Field(256, ge=1)
    max_model_len: int | None = pydantic.Field(None, ge=1)
    schedule_conservativeness: float = pydantic.Field(0.0, ge=0.0)

    # KV cache sizing.
    page_size: int = pydantic.Field(16, ge=1)
    kv_cache_tokens: int | None = pydantic.Field(None, ge=1)
    gpu_memory_utilization: float = pydantic.Field(0.85, gt=0.0, le=1.0)
    cpu_kv_cache_bytes: int = pydantic.Field(512 << 20, ge=1)

    # CUDA graphs for decode steps (on a CUDA device with a backend that supports them).
    disable_cuda_graph: bool = False
    cuda_graph_max_bs: int = pydantic.Field(256, ge=0)  # largest captured batch size
    # Mixed steps (prefill beside decodes) of up to this many tokens replay graphs too (0: off).
    cuda_graph_mixed_max_tokens: int = pydantic.Field(8192, ge=0)

    # Overlap scheduling: prepare step N+1 on the CPU while the GPU runs step N.
    disable_overlap: bool = False
    # Where the detokenizer (text, stop strings, streaming) runs: "inline", after each step on
    # the step loop's thread; "thread", its own thread (with the GIL it took ~0.7 ms per step
    # from the loop at 256 requests on the H200); "process", a process of its own fed token
    # ids (core/detokenizer_process.py); "auto" (the default): "process" on a CUDA device,
    # where the host loop is the bottleneck (H200 2026-11-30: host 4.48 -> 3.20 ms per step,
    # 21,397 -> 23,121 tok/s), else "inline" (no child process for CPU engines).
    detokenizer: Literal["auto", "inline", "thread", "process"] = "auto"
    # Freeze the heap once start-up is done (`gc.freeze`, core/heap_freeze.py): no full garbage
    # collection walks the start-up objects (~250 ms on a CPU) inside the step loop.
    gc_freeze: bool = True
    # Fused Triton kernels (RMSNorm + residual, SiLU-and-mul, rotary) on CUDA devices.
    disable_fused_kernels: bool = False

    # Tensor parallelism (`pegboard.core.distributed`): ranks, nodes, rendezvous, timeout.
    tp_size: int = pydantic.Field(1, ge=1)
    nnodes: int = pydantic.Field(1, ge=1)
    node_rank: int = pydantic.Field(0, ge=0)
    dist_init_addr: str | None = None  # HOST:PORT of rank 0's rendezvous; None: a free local port
    dist_timeout: float = pydantic.Field(600.0, gt=0)  # seconds a collective may wait for a rank

    # Mixture of experts (`pegboard.core.moe`, docs/moe.md; SGLang's flag names).
    ep_size: int = pydantic.Field(1, ge=1)
    ep_num_redundant_experts: int = pydantic.Field(0, ge=0)
    eplb_rebalance_num_iterations: int = pydantic.Field(1000, ge=1)
    expert_distribution_recorder_mode: Literal["stat", "per_pass"] | None = None
    init_expert_location: str = "trivial"  # or a JSON file with physical_to_logical
    moe_router_skew: float = pydantic.Field(0.0, ge=0.0)  # benchmarks: Zipf bias on router logits
    moe_kernel: Literal["auto", "triton", "torch"] = "auto"  # routed experts: fused Triton or torch

    # Prefill/decode disaggregation (`pegboard.core.disaggregation`; SGLang's flag names).
    disaggregation_mode: Literal["null", "prefill", "decode"] = "null"
    disaggregation_bootstrap_port: int = pydantic.Field(8998, ge=0, le=65535)
    disaggregation_bootstrap_timeout: float = pydantic.Field(30.0, gt=0)
    disaggregation_waiting_timeout: float = pydantic.Field(300.0, gt=0)
    disaggregation_heartbeat_interval: float = pydantic.Field(2.0, gt=0)

    @pydantic.model_validator(mode="after")
    def _expert_parallel_ranks(self) -> EngineConfig:
        """The experts are spread over the tensor-parallel ranks: `--ep-size N` alone starts N
        ranks (attention split over them as under `--tp-size N`); with `--tp-size` it must match."""
        if self.ep_size > 1 and self.tp_size == 1:
            self.tp_size = self.ep_size
        elif self.ep_size > 1 and self.ep_size != self.tp_size:
            raise ValueError(
                f"--ep-size {self.ep_size} must equal --tp-size {self.tp_size}: the experts are "
                "spread over the tensor-parallel ranks (or give --ep-size alone)"
            )
        return self

    @pydantic.model_validator(mode="after")
    def _kv_cache_layout(self) -> EngineConfig:
        """`--kv-cache-layout hdp` is for FP8 pools, and speculative decoding moves accepted
        draft KV token by token through NHD views (`core/speculative/tree.py`)."""
        if self.kv_cache_layout != "hdp":
            return self
        if self.kv_cache_dtype == "auto":
            raise ValueError("--kv-cache-layout hdp needs --kv-cache-dtype fp8_e4m3")
        if self.speculator is not None:
            raise ValueError(
                f"--kv-cache-layout hdp cannot serve with --speculator {self.speculator}: "
                "accepted draft tokens' KV is moved in the nhd layout; use --kv-cache-layout nhd"
            )
        return self

    def value_layout(self, on_cuda: bool, attention: str) -> Literal["nhd", "hdp"]:
        """The KV pool's value layout: `--kv-cache-layout` when named; `auto` is `hdp` for an
        FP8 pool that the `triton` backend serves on CUDA without speculation (its e4m3
        tensor-core decode reads values transposed per page: the nano-vllm workload on the
        H200, 2026-12-01, 25,493 output tok/s vs 22,203 with `nhd` and 24,078 with bf16 KV),
        else `nhd` (what every backend, the speculators' KV moves and the CPU path read)."""
        if self.kv_cache_layout != "auto":
            return self.kv_cache_layout
        fp8 = self.kv_cache_dtype.startswith("fp8")
        if fp8 and on_cuda and attention == "triton" and self.speculator is None:
            return "hdp"
        return "nhd"

    @property
    def graph_max_bs(self) -> int:
        """The largest decode batch captured as a CUDA graph: 0 when graphs are disabled."""
        return 0 if self.disable_cuda_graph else self.cuda_graph_max_bs

    def selection(self, slot: str) -> str | list[str] | None:
        # None for a slot engines do not select (`router`: SlotSpec.process), which has no field
        return getattr(self, slot, None)
