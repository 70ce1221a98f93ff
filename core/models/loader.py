"""Load a local HuggingFace checkpoint into our own decoder implementation."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from pegboard.core import kernels
from pegboard.core.models.config import ModelConfig
from pegboard.core.models.errors import ModelLoadError
from pegboard.core.models.llama import CausalLM
from pegboard.core.models.quantization import (
    LinearChoice,
    builtin_linear,
    describe_layers,
    detect_quantization,
    linear_factory,
)
from pegboard.core.models.weights import load_checkpoint
from pegboard.sdk.linear import LinearLayer
from pegboard.sdk.types import ModelInfo

log = logging.getLogger("pegboard.models")

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
_DTYPE_ALIASES = {
    "fp32": "float32",
    "float": "float32",
    "bf16": "bfloat16",
    "fp16": "float16",
    "half": "float16",
}


@dataclass
class LoadedModel:
    """A model ready to run, its parsed config and the facts plugins size themselves by."""

    model: CausalLM
    config: ModelConfig
    info: ModelInfo


def resolve_device(device: str) -> torch.device:
    """`"auto"`: the first CUDA GPU if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as e:
        raise ModelLoadError(f"device {device!r} is not a valid torch device") from e
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, cfg: ModelConfig, device: torch.device) -> torch.dtype:
    """`"auto"`: the checkpoint's `torch_dtype` on CUDA (bfloat16 if unset), float32 on CPU."""
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return DTYPES.get(cfg.torch_dtype or "bfloat16", torch.bfloat16)
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in DTYPES:
        raise ModelLoadError(f"dtype {dtype!r} is not supported; choose auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_max_model_len(cfg: ModelConfig, requested: int | None) -> int:
    """The context length served: the requested one, at most the config's
    `max_position_embeddings`, and at most the sliding window (within the window, sliding-window
    attention equals full attention, which is what the backends compute)."""
    length = cfg.max_position_embeddings
    if requested is not None:
        if requested > length:
            log.warning(
                "max_model_len %d exceeds the model's max_position_embeddings %d; using %d",
                requested,
                length,
                length,
            )
        length = min(requested, length)
    if cfg.sliding_window is not None and cfg.sliding_window < length:
        log.warning(
            "%s uses sliding-window attention (window %d); max_model_len is capped from %d to %d",
            cfg.architecture,
            cfg.sliding_window,
            length,
            cfg.sliding_window,
        )
        length = cfg.sliding_window
    return length


def load_model(
    model_dir: str | Path,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    progress: bool = True,
    load_format: str = "auto",
    fused_kernels: bool = True,
    tp=None,
    linear: LinearChoice | None = None,
    quantization: str | None = None,
) -> LoadedModel:
    """Build the decoder for `model_dir/config.json` and fill it from its safetensors files.

    Parameters are allocated once, on the target device and dtype, and each checkpoint tensor is
    read onto that device and copied in. Raises `ModelLoadError` with the file or field at fault.
    `load_format="dummy"` fills the weights with random values instead (benchmarks of real
    configs without their weights, as vLLM's `--load-format dummy`); only config.json is read.
    `fused_kernels=True` runs the decoder's norms, rope and SiLU-and-mul as fused Triton kernels
    (`pegboard.core.kernels`) where they can run: on a CUDA device with Triton installed;
    elsewhere, or with `fused_kernels=False` (`--disable-fused-kernels`), the PyTorch ops run.
    `model.fused_kernels` says which. With `tp` (a `pegboard.core.distributed.TensorParallel`)
    the model is this rank's shard: its heads, columns and vocab rows, read as slices.
    `linear` is the selected linear plugin (the engine's `linear` slot) that builds every
    projection; without one, the built-in `bf16` or, for a quantized checkpoint, `w4a16`.
    `quantization` is `--quantization` (checked against config.json; `gguf`: the GGUF file).
    """
    if load_format not in ("auto", "dummy"):
        raise ModelLoadError(f"load_format {load_format!r} is not supported; choose auto or dummy")
    model_dir = Path(model_dir)
    cfg = ModelConfig.from_dir(model_dir)
    shard = tp.shard(cfg) if tp is not None else None
    built = shard.local_config() if shard is not None else cfg  # this rank's layer sizes
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, cfg, target_device)
    length = resolve_max_model_len(cfg, max_model_len)
    info = ModelInfo(
        architecture=cfg.architecture,
        num_layers=cfg.num_layers,
        num_heads=built.num_heads,
        num_kv_heads=built.num_kv_heads,
        head_dim=cfg.head_dim,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        max_model_len=length,
        dtype=target_dtype,
        device=target_device,
    )
    linear = linear or builtin_linear(detect_quantization(model_dir, quantization, load_format))
    factory = linear_factory(linear, info)
    with torch.device("meta"):
        model = CausalLM(built, length, factory)
    # Allocate uninitialised storage (no random init: every value comes from the checkpoint).
    model = model.to(target_dtype).to_empty(device=target_device)
    model.tie_weights()
    model.model.rotary_emb.reset_tables()
    if load_format == "dummy":
        _fill_random(model)
    else:
        gguf = linear.quantization.gguf_file if linear.quantization else None
        load_checkpoint(
            model,
            model_dir,
            target_device,
            cfg.tie_word_embeddings,
            progress,
            shard,
            gguf=Path(gguf) if gguf else None,
            cfg=cfg,
        )
    if shard is not None:
        shard.install(model)  # the all-reduces and all-gathers that join the shards
    model.eval().requires_grad_(False)
    if fused_kernels:
        reason = kernels.unavailable_reason(target_device)
        if reason is None:
            model.set_fused_kernels(True)
        else:
            log.info("fused kernels off: %s", reason)
    log.info("linear layers (%s): %s", linear.name, describe_layers(model))
    return LoadedModel(model=model, config=cfg, info=info)


@torch.no_grad()
def _fill_random(model: CausalLM, seed: int = 0) -> None:
    """Random weights of a realistic scale: norms at 1, everything else N(0, 0.02)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        else:
            param.normal_(0.0, 0.02, generator=generator)
    for module in model.modules():
        if isinstance(module, LinearLayer) and not module.loads_by_parameter:
            module.fill_random(generator)
