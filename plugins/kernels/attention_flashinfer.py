"""The `flashinfer` attention backend: paged attention through FlashInfer's wrappers.

FlashInfer reads the KV pool in place: each layer's `pool.k[layer]` and `pool.v[layer]` are
`[num_pages, page_size, num_kv_heads, head_dim]`, which is its "NHD" paged layout with keys
and values in separate tensors, so `(k, v)` is passed as the paged cache and a request's pages
are its page-table entries (`kv_indices`), `kv_indptr` their offsets and `kv_last_page_len`
how many slots of its last page hold tokens.

Per step, `prepare` plans one wrapper (host work and one copy to the device): the decode
wrapper when every request has one new token, else the paged prefill wrapper (FA2, causal,
which covers prefill over a cached prefix, chunked prefill and prefill mixed with decodes).
Per layer, `forward` stores the new keys and values with the Triton store-KV kernel (a
negative slot stores nothing), then runs the planned wrapper.

FP8 pools (`--kv-cache-dtype fp8_e4m3`): both wrappers are planned with the pool's e4m3 type
as `kv_data_type` (bf16/fp16 queries and output) and read it in place, converting in
registers; store-KV writes `value / scale` saturated to e4m3 as for the triton backend, and
each layer's scales go to `run` (`k_scale` folds into the softmax scale, `v_scale` multiplies
the output).

CUDA graphs: after `prepare_for_capture(max_requests)`, decode runs through wrappers in
FlashInfer's CUDA-graph mode, one per power-of-two batch size, whose index buffers are slices
of buffers allocated once. A decode batch of n rows runs as the next power of two: padding
requests read one key of page 0 and their outputs are dropped. Because every size the core
captures is padded to the same power of two as any batch it replays with that graph (the
core's capture sizes include every power of two below their largest), `prepare` of the real
batch plans exactly the wrapper the captured graph launches.

FlashInfer compiles its kernels with nvcc at first use; `pegboard kernels build` compiles them
ahead (`pegboard.plugins.kernels.flashinfer_kernels`), and the `kernel_dir` option (or
PEGBOARD_FLASHINFER_KERNELS) points FlashInfer at them. This module imports FlashInfer only
when a backend is built, so `pegboard plugins` lists the plugin everywhere; selecting it
without FlashInfer or without a CUDA device fails at setup with the reason.
"""

from __future__ import annotations

import importlib.util
import itertools
import logging
import os
from typing import ClassVar, Literal

import numpy as np
import pydantic
import torch
from pegboard.core.hookspecs import hookimpl
from pegboard.plugins.kernels import flashinfer_kernels
from pegboard.sdk.slots import Attention, AttentionBackend, Plugin, PluginContext
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo

log = logging.getLogger("pegboard.flashinfer")


class FlashInferAttentionOptions(pydantic.BaseModel):
    """Options of `FlashInferAttention`."""

    model_config = pydantic.ConfigDict(extra="forbid")

    kernel_dir: str | None = pydantic.Field(
        None,
        json_schema_extra={"start_time_only": True},  # loads .so files: not over HTTP
        description=(
            "Directory of kernels prebuilt by `pegboard kernels build --out DIR`; FlashInfer "
            f"loads them instead of compiling. Default: ${flashinfer_kernels.KERNEL_DIR_ENV}."
        ),
    )
    jit: bool = pydantic.Field(
        True,
        description=(
            "Let FlashInfer compile (nvcc, 1-2 min each) kernels that are not prebuilt; with "
            "false, a missing kernel fails at startup naming the build command."
        ),
    )
    decode_tensor_cores: Literal["auto", "on", "off"] = pydantic.Field(
        "auto",
        description=(
            "Decode with the tensor-core (prefill) kernel. auto: for GQA groups of 4 or more, "
            "and for group sizes the CUDA-core decode kernel lacks (5, 6, 7, >8)."
        ),
    )
    workspace_mb: int = pydantic.Field(
        128, ge=16, le=4096, description="FlashInfer's float workspace (split-KV partials), MiB."
    )


class FlashInferAttentionBackend(AttentionBackend):
    """Paged attention (`pegboard.sdk.AttentionBackend`) with FlashInfer's decode and FA2
    prefill wrappers; see the module docstring for the layout and the CUDA graph scheme."""

    supports_cuda_graph = True
    #: Reads and writes an FP8 KV pool (`--kv-cache-dtype fp8_e4m3`) with per-layer scales.
    supports_fp8_kv = True

    def __init__(
        self,
        model: ModelInfo,
        pool: KVPool,
        scale: float | None = None,
        *,
        kernel_dir: str | None = None,
        jit: bool = True,
        decode_tensor_cores: Literal["auto", "on", "off"] = "auto",
        workspace_mb: int = 128,
    ) -> None:
        super().__init__(model, pool, scale)
        import flashinfer
        from pegboard.plugins.kernels.triton_attention import store_kv

        if pool.v_layout != "nhd":  # FlashInfer's paged kernels read NHD values only
            raise ValueError(
                f"the flashinfer attention backend reads NHD values, and this pool stores them "
                f"{pool.v_layout!r} (--kv-cache-layout); choose --attention triton or "
                "--kv-cache-layout nhd"
            )
        if model.num_heads % model.num_kv_heads:
            raise ValueError(
                f"num_heads ({model.num_heads}) must be a multiple of num_kv_heads "
                f"({model.num_kv_heads})"
            )
        kernel_dir = kernel_dir or os.environ.get(flashinfer_kernels.KERNEL_DIR_ENV)
        if kernel_dir:
            flashinfer_kernels.use_kernel_dir(kernel_dir)
        self.kernels = flashinfer_kernels.required_kernels(model.head_dim, model.dtype, pool.dtype)
        _check_prebuilt(self.kernels, jit)
        group = model.num_heads // model.num_kv_heads
        self.tensor_cores = decode_tensor_cores == "on" or (
            decode_tensor_cores == "auto"
            and (group >= 4 or group not in flashinfer_kernels.DECODE_GROUP_SIZES)
        )
        if not self.tensor_cores and group not in flashinfer_kernels.DECODE_GROUP_SIZES:
            raise ValueError(
                f"FlashInfer's CUDA-core decode kernel has no GQA group size {group}; use "
                "decode_tensor_cores auto or on"
            )
        self.flashinfer = flashinfer
        self.store_kv = store_kv
        self.device = pool.k[0].device
        self.page_size = pool.page_size
        self.workspace = torch.zeros(workspace_mb << 20, dtype=torch.uint8, device=self.device)
        self.prefill = flashinfer.BatchPrefillWithPagedKVCacheWrapper(
            self.workspace, "NHD", backend="fa2"
        )
        self.decode = self._decode_wrapper()
        self.graph_decode: dict[int, object] = {}  # padded batch size -> CUDA-graph wrapper
        self.max_requests = 0  # set by prepare_for_capture
        self.batch: ForwardBatch | None = None
        self.is_decode = False
        self.decode_rows = 0  # rows the planned decode wrapper runs (the padded batch)
        self.planned = None  # the wrapper `forward` runs
        self.plan_done: torch.cuda.Event | None = None

    def _decode_wrapper(self, size: int = 0):
        """An eager decode wrapper (size 0), or a CUDA-graph one for `size` requests over the
        shared fixed index buffers."""
        if not size:
            return self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                self.workspace, "NHD", use_tensor_cores=self.tensor_cores, backend="fa2"
            )
        wrapper = self.flashinfer.BatchDecodeWithPagedKVCacheWrapper(
            self.workspace,
            "NHD",
            use_cuda_graph=True,
            use_tensor_cores=self.tensor_cores,
            paged_kv_indptr_buffer=self.kv_indptr[: size + 1],
            paged_kv_indices_buffer=self.kv_indices,
            paged_kv_last_page_len_buffer=self.kv_last_page_len[:size],
            backend="fa2",
        )
        return wrapper

    def prepare_for_capture(self, max_requests: int) -> None:
        """Allocate the fixed index buffers for batches of up to `max_requests` requests (padded
        to a power of two) of any context length, and one CUDA-graph decode wrapper per power
        of two up to that."""
        self.max_requests = _pow2(max_requests)
        pages = -(-self.model.max_model_len // self.page_size)
        dev = self.device
        self.kv_indptr = torch.zeros(self.max_requests + 1, dtype=torch.int32, device=dev)
        self.kv_last_page_len = torch.zeros(self.max_requests, dtype=torch.int32, device=dev)
        self.kv_indices = torch.zeros(self.max_requests * pages, dtype=torch.int32, device=dev)
        self.kv_indices_staging = torch.zeros_like(self.kv_indices)
        sizes = [1 << i for i in range(self.max_requests.bit_length())]
        self.graph_decode = {size: self._decode_wrapper(size) for size in sizes}

    def prepare(self, batch: ForwardBatch) -> None:
        """Build the batch's page index arrays on the host and plan the decode wrapper (every
        request has one new token) or the prefill wrapper."""
        if self.plan_done is not None:
            # FlashInfer's plan refills one pinned host buffer that the previous step's copy
            # may not have read yet (when the host runs ahead of the device).
            self.plan_done.synchronize()
        n = batch.num_requests
        self.is_decode = batch.is_decode_only
        rows = n
        if self.is_decode and self.graph_decode:
            rows = _pow2(n)
            if rows > self.max_requests:
                raise RuntimeError(
                    f"a decode batch of {n} requests exceeds the {self.max_requests} fixed "
                    "for CUDA graphs"
                )
        indptr, indices, last_page_len = page_arrays(
            batch.seq_lens_cpu,
            batch.page_tables_cpu,
            self.page_size,
            rows,
            batch.page_tables_array,
        )
        common = dict(
            num_qo_heads=self.model.num_heads,
            num_kv_heads=self.model.num_kv_heads,
            page_size=self.page_size,
            sm_scale=self.scale,
            q_data_type=self.model.dtype,
            kv_data_type=self.pool.k[0].dtype,
        )
        if self.is_decode:
            wrapper = self.graph_decode.get(rows) or self.decode
            if wrapper is self.decode:
                indices_arg = _pinned(indices)
            else:  # the graph wrapper copies device indices asynchronously, host ones not
                indices_arg = self.kv_indices_staging[: len(indices)]
                indices_arg.copy_(_pinned(indices), non_blocking=True)
            wrapper.plan(
                _pinned(indptr),
                indices_arg,
                _pinned(last_page_len),
                head_dim=self.model.head_dim,
                **common,
            )
            self.decode_rows = rows
        else:
            qo_indptr = np.zeros(n + 1, dtype=np.int32)
            np.cumsum(batch.query_lens_cpu, out=qo_indptr[1:])
            wrapper = self.prefill
            wrapper.plan(
                _pinned(qo_indptr),
                _pinned(indptr),
                _pinned(indices),
                _pinned(last_page_len),
                head_dim_qk=self.model.head_dim,
                causal=True,
                **common,
            )
        self.planned = wrapper
        self.batch = batch
        if self.plan_done is None:
            self.plan_done = torch.cuda.Event()
        self.plan_done.record()

    def forward(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """Store `k`/`v` at the batch's slots, then run the planned decode or prefill."""
        k_cache, v_cache = self.pool.k[layer], self.pool.v[layer]
        k_scale, v_scale = self.pool.k_scale(layer), self.pool.v_scale(layer)
        self.store_kv(k, v, k_cache, v_cache, self.batch.slot_mapping, k_scale, v_scale)
        if q.stride(-1) != 1:
            q = q.contiguous()
        rows = q.shape[0]
        scales = dict(k_scale=k_scale, v_scale=v_scale) if self.pool.is_fp8 else {}
        if not self.is_decode:
            out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
            return self.planned.run(q, (k_cache, v_cache), out=out, **scales)
        padded = self.decode_rows
        if rows > padded:
            raise RuntimeError(f"decode forward got {rows} rows, the plan was for {padded}")
        if rows < padded:  # a graph's padded batch: the plan covers its power of two
            q_full = q.new_empty((padded, *q.shape[1:]))
            q_full[:rows] = q
            q = q_full
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        return self.planned.run(q, (k_cache, v_cache), out=out, **scales)[:rows]


class FlashInferAttention(Attention):
    """Plugin `flashinfer` (slot `attention`): paged decode and prefill (over a cached prefix)
    through FlashInfer's wrappers, CUDA-graph compatible for decode, over a bf16/fp16 or an
    FP8 e4m3 KV pool (`--kv-cache-dtype fp8_e4m3`).

    Needs the `flashinfer-python` package (`pip install 'pegboard[gpu]'`) and a CUDA device;
    kernels are compiled by FlashInfer at first use unless prebuilt (`pegboard kernels
    build`, then `--flashinfer-kernel-dir DIR`). Selecting it where it cannot run fails at
    setup with the reason."""

    Options: ClassVar[type[pydantic.BaseModel]] = FlashInferAttentionOptions

    @classmethod
    def unavailable(cls) -> str | None:
        """Why the kernels cannot run here (no CUDA device, a missing package), or None."""
        try:
            _require_runtime(torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        except RuntimeError as e:
            return str(e)
        return None

    def setup(self, ctx: PluginContext, previous: Plugin | None = None) -> None:
        """Fail early, with the reason, where the kernels cannot run."""
        _require_runtime(ctx.device)

    @hookimpl
    def attention_kernel(self, model: ModelInfo, pool: KVPool) -> AttentionBackend:
        _require_runtime(model.device)
        return FlashInferAttentionBackend(model, pool, **self.options.model_dump())


def _require_runtime(device: torch.device) -> None:
    """Raise a RuntimeError saying why FlashInfer's kernels cannot run on `device`, if so."""
    for package, dist in (("flashinfer", "flashinfer-python"), ("triton", "triton")):
        if importlib.util.find_spec(package) is None:
            raise RuntimeError(
                f"the flashinfer attention backend needs the `{dist}` package, which is not "
                "installed (pip install 'pegboard[gpu]'); choose --attention torch"
            )
    if device.type != "cuda":
        raise RuntimeError(
            f"the flashinfer attention backend needs a CUDA device, and the model is on "
            f"{device.type}; choose --attention torch (or triton)"
        )
    try:
        import flashinfer  # noqa: F401
    except Exception as e:  # a broken install: say so rather than fail later
        raise RuntimeError(f"the flashinfer package failed to import: {e}") from e


def _check_prebuilt(kernels: list[flashinfer_kernels.Kernel], jit: bool) -> None:
    """Warn (or, without JIT, fail) when FlashInfer would compile a kernel at first use."""
    missing = [k for k in kernels if not flashinfer_kernels.prebuilt(k)]
    if not missing:
        return
    names = ", ".join(k.name for k in missing)
    fp8 = any(k.kv_dtype == "float8_e4m3fn" for k in missing)
    kv = " --kv-cache-dtype fp8_e4m3" if fp8 else ""
    how = (
        f"prebuild them with `pegboard kernels build --arch <sm>{kv} --out DIR` and pass "
        f"--flashinfer-kernel-dir DIR (or set {flashinfer_kernels.KERNEL_DIR_ENV})"
    )
    if not jit:
        raise RuntimeError(f"FlashInfer kernels not prebuilt: {names}; {how}")
    log.warning("FlashInfer will compile %s at first use (1-2 min each); %s", names, how)


def page_arrays(
    seq_lens: list[int],
    page_tables: list[list[int]],
    page_size: int,
    rows: int,
    table: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FlashInfer's paged-KV description of a batch, int32: `kv_indptr` `[rows + 1]`,
    `kv_indices` (each request's first `ceil(seq_len / page_size)` pages, concatenated) and
    `kv_last_page_len` `[rows]`. Rows past the requests (padding up to `rows`) get one page,
    page 0, holding one token. `table`: the page tables as one padded array
    (`ForwardBatch.page_tables_array`), read by one numpy mask instead of page by page."""
    n = len(seq_lens)
    lens = np.asarray(seq_lens, dtype=np.int64)
    num_pages = -(-lens // page_size)
    indptr = np.zeros(rows + 1, dtype=np.int32)
    np.cumsum(num_pages, out=indptr[1 : n + 1])
    indptr[n + 1 :] = indptr[n] + np.arange(1, rows - n + 1)
    last_page_len = np.ones(rows, dtype=np.int32)
    last_page_len[:n] = lens - (num_pages - 1) * page_size
    indices = np.zeros(int(indptr[-1]), dtype=np.int32)
    if table is not None and table.shape[0] == n and table.shape[1] >= num_pages.max(initial=0):
        indices[: indptr[n]] = table[np.arange(table.shape[1]) < num_pages[:, None]]
        return indptr, indices, last_page_len
    indices[: indptr[n]] = np.fromiter(
        itertools.chain.from_iterable(
            table[:count] for table, count in zip(page_tables, num_pages.tolist())
        ),
        dtype=np.int32,
        count=int(indptr[n]),
    )
    return indptr, indices, last_page_len


def _pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(n - 1, 0).bit_length()


def _pinned(array: np.ndarray) -> torch.Tensor:
    """A pinned host tensor of `array`: FlashInfer's plans copy it to the device
    asynchronously."""
    return torch.from_numpy(array).pin_memory()
