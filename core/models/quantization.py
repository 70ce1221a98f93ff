"""Which weight quantization a checkpoint uses, and which linear plugin serves it.

`config.json`'s `quantization_config` names the method (auto-detection); `--quantization NAME`
(SGLang's names) must agree with it, or names `gguf` to serve a model's GGUF file natively
(the bundled SmolLM2 ships as one). With `--load-format dummy` it makes random weights of that
method's layout (benchmarks of a real config without its checkpoint).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pegboard.core.models.errors import ModelLoadError
from pegboard.sdk.linear import (
    LinearLayer,
    LinearMethod,
    LinearSpec,
    QuantizationConfig,
    QuantizationError,
)
from pegboard.sdk.types import ModelInfo
from torch import nn

log = logging.getLogger("pegboard.models")

METHODS = ("gptq", "awq", "compressed-tensors", "gguf")


@dataclass
class LinearChoice:
    """The linear plugin the model is built with: its name, the `linear_kernel` hook to call
    (the plugin manager's, or a built-in plugin's method), and the checkpoint's quantization."""

    name: str
    kernel: Callable[..., LinearMethod | None]
    quantization: QuantizationConfig | None


def default_linear(quant: QuantizationConfig | None) -> str:
    """The `linear` plugin used when the user names none: `w4a16` for a quantized
    checkpoint, `bf16` otherwise."""
    return "w4a16" if quant is not None else "bf16"


def builtin_linear(quant: QuantizationConfig | None) -> LinearChoice:
    """The built-in plugin for `quant`, without a plugin manager (tests, tools)."""
    from pegboard.plugins.linear.bf16 import BF16Linear
    from pegboard.plugins.linear.w4a16 import W4A16Linear

    plugin = W4A16Linear() if quant is not None else BF16Linear()
    return LinearChoice(default_linear(quant), plugin.linear_kernel, quant)


def select_linear(plugins, config, model_dir: Path) -> LinearChoice:
    """Select and register the engine's `linear` plugin (`--linear`, else by the checkpoint's
    quantization), before the model is built. Raises `ModelLoadError` naming the plugin when
    it cannot read the checkpoint's format."""
    from pegboard.sdk.slots import PluginContext

    quant = detect_quantization(model_dir, config.quantization, config.load_format)
    name = config.linear or default_linear(quant)
    plugin = plugins.create("linear", name, config.plugin_options.get(name))
    if quant is not None and quant.method not in plugin.formats:
        raise ModelLoadError(
            f"linear plugin {name!r} cannot read {quant.method} checkpoints (it reads: "
            f"{', '.join(plugin.formats) or 'unquantized weights only'}); drop --linear or "
            "choose w4a16"
        )
    plugin.setup(PluginContext())
    plugins.register(plugin)
    return LinearChoice(name, plugins.hook.linear_kernel, quant)


def linear_factory(choice: LinearChoice, info: ModelInfo):
    """The model's `LinearFactory`: asks the plugin for its method once, then one layer per
    projection; checks what the plugin returns and names it in every error."""
    try:
        method = choice.kernel(model=info, quantization=choice.quantization)
    except QuantizationError as e:
        raise ModelLoadError(f"linear plugin {choice.name!r}: {e}") from e
    if not isinstance(method, LinearMethod):
        raise ModelLoadError(
            f"linear plugin {choice.name!r} returned {type(method).__name__}, not a LinearMethod"
        )

    def make(name: str, in_features: int, out_features: int, shards, bias: bool) -> LinearLayer:
        spec = LinearSpec(name, in_features, out_features, shards, bias, info.dtype, info.device)
        try:
            layer = method.create(spec)
        except QuantizationError as e:
            raise ModelLoadError(f"linear plugin {choice.name!r}: {e}") from e
        if not isinstance(layer, LinearLayer):
            raise ModelLoadError(
                f"linear plugin {choice.name!r} built {type(layer).__name__} for {name}, "
                "not a LinearLayer"
            )
        return layer

    return make


def detect_quantization(
    model_dir: Path, requested: str | None, load_format: str = "auto"
) -> QuantizationConfig | None:
    """The checkpoint's `QuantizationConfig` (None: unquantized). Raises `ModelLoadError` for
    an unknown method, a `--quantization` the checkpoint contradicts, or a config it lacks."""
    if requested is not None and requested not in METHODS:
        raise ModelLoadError(
            f"--quantization {requested!r} is not supported; choose {', '.join(METHODS)}"
        )
    raw = _read_config(model_dir).get("quantization_config")
    if raw is not None:
        method = str(raw.get("quant_method", "")).lower().replace("_", "-")
        if method not in METHODS:
            raise ModelLoadError(
                f"{model_dir / 'config.json'}: quantization_config.quant_method {method!r} is "
                f"not supported; supported: {', '.join(METHODS)}"
            )
        if requested is not None and requested != method:
            raise ModelLoadError(
                f"--quantization {requested} but {model_dir / 'config.json'} says {method}"
            )
        return _parse(method, raw, model_dir)
    if requested == "gguf":
        gguf = None if load_format == "dummy" else str(find_gguf(model_dir))
        return QuantizationConfig("gguf", group_size=32, sym=False, gguf_file=gguf)
    if requested is not None:
        if load_format == "dummy":  # random weights in this method's layout, group 128
            return QuantizationConfig(requested)
        raise ModelLoadError(
            f"--quantization {requested}: {model_dir / 'config.json'} has no "
            "quantization_config (is this the quantized checkpoint?)"
        )
    return None


def find_gguf(model_dir: Path) -> Path:
    """The GGUF file of `model_dir`: the one `*.gguf` in it, or, for the bundled default
    model's converted directory, the package's original file."""
    files = sorted(model_dir.glob("*.gguf"))
    if len(files) == 1:
        return files[0]
    if len(files) > 1:
        raise ModelLoadError(f"{model_dir} holds several GGUF files: {[f.name for f in files]}")
    from pegboard.core import default_model

    default_dir = default_model.cache_root() / "models" / default_model.MODEL_NAME
    if model_dir.resolve() == default_dir.resolve():
        return default_model.bundled_gguf()
    raise ModelLoadError(f"--quantization gguf: no *.gguf file in {model_dir}")


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}  # ModelConfig.from_dir reports it
    return raw if isinstance(raw, dict) else {}


def _parse(method: str, raw: dict[str, Any], model_dir: Path) -> QuantizationConfig:
    where = f"{model_dir / 'config.json'}: quantization_config"
    if method == "compressed-tensors":
        return _parse_compressed_tensors(raw, where)
    if method == "awq" and str(raw.get("version", "gemm")).lower() != "gemm":
        raise ModelLoadError(f"{where}: AWQ version {raw.get('version')!r}; only GEMM is supported")
    checkpoint_format = str(raw.get("checkpoint_format", "gptq" if method == "gptq" else ""))
    if method == "gptq" and checkpoint_format not in ("gptq", "gptq_v2"):
        raise ModelLoadError(
            f"{where}: GPTQ checkpoint_format {checkpoint_format!r}; only gptq and gptq_v2 are "
            "supported (repack it with GPTQModel to one of those)"
        )
    return QuantizationConfig(
        method,
        bits=int(raw.get("bits", raw.get("w_bit", 4))),
        group_size=int(raw.get("group_size", raw.get("q_group_size", 128))),
        sym=bool(raw.get("sym", method == "gptq")),
        desc_act=bool(raw.get("desc_act", False)),
        checkpoint_format=checkpoint_format,
        ignore=tuple(raw.get("modules_to_not_convert") or ()),
    )


def _parse_compressed_tensors(raw: dict[str, Any], where: str) -> QuantizationConfig:
    groups = raw.get("config_groups") or {}
    if len(groups) != 1:
        raise ModelLoadError(f"{where}: {len(groups)} config_groups; exactly one is supported")
    (group,) = groups.values()
    fmt = group.get("format") or raw.get("format")
    if fmt != "pack-quantized":
        raise ModelLoadError(f"{where}: format {fmt!r}; only pack-quantized is supported")
    weights = group.get("weights") or {}
    if group.get("input_activations"):
        raise ModelLoadError(f"{where}: quantized activations; only weight-only is supported")
    strategy = weights.get("strategy", "group")
    if strategy not in ("group", "channel"):
        raise ModelLoadError(f"{where}: weight strategy {strategy!r}; use group or channel")
    return QuantizationConfig(
        "compressed-tensors",
        bits=int(weights.get("num_bits", 4)),
        group_size=-1 if strategy == "channel" else int(weights.get("group_size") or 128),
        sym=bool(weights.get("symmetric", True)),
        desc_act=weights.get("actorder") not in (None, False),
        ignore=tuple(raw.get("ignore") or ()),
    )


def describe_layers(model: nn.Module) -> str:
    """One line on how the projections are stored and multiplied, fallbacks named by layer:
    said once at load."""
    kinds: Counter[str] = Counter()
    named: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LinearLayer):
            how = module.describe()
            kinds[how] += 1
            named.setdefault(how, []).append(name)
    parts = []
    for how, count in kinds.items():
        if how.startswith("dense fallback"):
            layers = named[how]
            shown = ", ".join(layers[:3]) + (
                f" and {len(layers) - 3} more" if len(layers) > 3 else ""
            )
            parts.append(f"{count} x {how} ({shown})")
        else:
            parts.append(f"{count} x {how}")
    return "; ".join(parts)


def check_kv_dtype(
    backend: object, pool, attention: str, model: nn.Module | None = None, scales_file=None
) -> None:
    """Refuse, before serving, an attention backend that cannot read the pool's storage type:
    an FP8 pool (`--kv-cache-dtype fp8_e4m3`) needs a backend whose class sets
    `supports_fp8_kv = True` (the `triton`, `flashinfer` and `torch` backends), and values
    stored in a layout other than `"nhd"` (`--kv-cache-layout`) one that lists it in
    `v_layouts` (`triton`, `torch`). An FP8 pool
    takes its per-layer K/V scales from `scales_file` (`--kv-cache-scales`) when given, else the
    checkpoint's (`model.kv_scales`), 1.0 for layers without one."""
    if pool.is_fp8 and not getattr(type(backend), "supports_fp8_kv", False):
        raise ValueError(
            f"attention plugin {attention!r} does not read an FP8 KV cache "
            "(--kv-cache-dtype fp8_e4m3); choose --attention triton, flashinfer or torch, or "
            "drop --kv-cache-dtype"
        )
    layout = getattr(pool, "v_layout", "nhd")
    if layout not in getattr(type(backend), "v_layouts", ("nhd",)):
        raise ValueError(
            f"attention plugin {attention!r} does not read values stored {layout!r} "
            f"(--kv-cache-layout {layout}); choose --attention triton or torch, or "
            "--kv-cache-layout nhd"
        )
    if scales_file is not None:
        if not pool.is_fp8:
            raise ValueError("--kv-cache-scales needs --kv-cache-dtype fp8_e4m3")
        pool.k_scales, pool.v_scales = read_kv_scales(Path(scales_file), len(pool.k))
        log.info("FP8 KV cache: per-layer scales from %s", scales_file)
        return
    scales = getattr(model, "kv_scales", None)
    if pool.is_fp8 and scales:
        layers = len(pool.k)
        pool.k_scales = [scales.get(i, {}).get("k", 1.0) for i in range(layers)]
        pool.v_scales = [scales.get(i, {}).get("v", 1.0) for i in range(layers)]
        log.info("FP8 KV cache: per-layer scales from the checkpoint for %d layers", len(scales))


def read_kv_scales(path: Path, layers: int) -> tuple[list[float], list[float]]:
    """`k_scales`, `v_scales` from a `--kv-cache-scales` file: one positive finite number per
    layer each. Raises ValueError naming the file and what is wrong."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"--kv-cache-scales {path}: cannot read it ({e})") from e
    out = []
    for key in ("k_scales", "v_scales"):
        values = raw.get(key) if isinstance(raw, dict) else None
        if not isinstance(values, list) or len(values) != layers:
            raise ValueError(
                f"--kv-cache-scales {path}: {key!r} must list one scale per layer ({layers})"
            )
        bad = [i for i, v in enumerate(values) if not isinstance(v, int | float) or not v > 0
               or v == float("inf")]  # fmt: skip
        if bad:
            raise ValueError(f"--kv-cache-scales {path}: {key}[{bad[0]}] is not a positive number")
        out.append([float(v) for v in values])
    return out[0], out[1]
