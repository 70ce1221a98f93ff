"""What the decoder implementation needs from a HuggingFace `config.json`, parsed and checked."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pegboard.core.models.errors import ModelLoadError
from pegboard.core.models.moe_config import MoEConfig, parse_moe

#: HF architecture class -> our family name. All share one decoder implementation (the MoE
#: families swap sparse layers' MLP for `pegboard.core.models.moe.MoEBlock`).
ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "Qwen3MoeForCausalLM": "qwen3_moe",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "MixtralForCausalLM": "mixtral",
}
_MODEL_TYPES = {family: arch for arch, family in ARCHITECTURES.items()}
ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters`, or the older `rope_scaling` +
    `rope_theta`)."""

    theta: float = 10000.0
    type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int | None = None


@dataclass(frozen=True)
class ModelConfig:
    """The decoder's shape and variant switches (biases, q/k norm, tied embeddings)."""

    architecture: str
    family: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope: RopeConfig
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    sliding_window: int | None
    torch_dtype: str | None
    moe: MoEConfig | None = None  # the experts of an MoE family; None for a dense model

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        """Read and check `model_dir/config.json`; raises `ModelLoadError` naming the field."""
        path = Path(model_dir) / "config.json"
        if not Path(model_dir).is_dir():
            raise ModelLoadError(f"model directory {model_dir} does not exist")
        if not path.is_file():
            raise ModelLoadError(f"{path} is missing: not a HuggingFace model directory")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ModelLoadError(f"{path} is not valid JSON: {e}") from e
        if not isinstance(raw, dict):
            raise ModelLoadError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse an HF config dict; `source` names it in error messages."""
        field = _FieldReader(raw, source)
        arch = _architecture(raw, source)
        family = ARCHITECTURES[arch]
        hidden = field.positive_int("hidden_size")
        heads = field.positive_int("num_attention_heads")
        kv_heads = field.positive_int("num_key_value_heads", default=heads)
        head_dim = field.positive_int("head_dim", default=hidden // heads)
        if head_dim % 2:
            raise ModelLoadError(f"{source}: head_dim {head_dim} is odd; rope needs an even size")
        if heads % kv_heads:
            raise ModelLoadError(
                f"{source}: num_attention_heads ({heads}) is not a multiple of "
                f"num_key_value_heads ({kv_heads})"
            )
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise ModelLoadError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
        attention_bias = bool(raw.get("attention_bias", False))
        return cls(
            architecture=arch,
            family=family,
            hidden_size=hidden,
            intermediate_size=field.positive_int("intermediate_size"),
            num_layers=field.positive_int("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=head_dim,
            vocab_size=field.positive_int("vocab_size"),
            max_position_embeddings=field.positive_int("max_position_embeddings"),
            rms_norm_eps=field.positive_float("rms_norm_eps", default=1e-6),
            rope=_rope(raw, source),
            # Qwen2 hard-codes q/k/v biases and no o_proj bias; the others follow attention_bias.
            qkv_bias=True
            if family == "qwen2"
            else bool(raw.get("qkv_bias", True))
            if family == "qwen2_moe"
            else attention_bias,
            o_bias=False if family in ("qwen2", "qwen2_moe") else attention_bias,
            mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(raw, family, source),
            torch_dtype=raw.get("torch_dtype") or raw.get("dtype"),
            moe=parse_moe(raw, family, source),
        )


class _FieldReader:
    """Typed access to config fields with errors that name the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw = raw
        self.source = source

    def positive_int(self, name: str, default: int | None = None) -> int:
        value = self.raw.get(name)
        if value is None:
            if default is None:
                raise ModelLoadError(f"{self.source}: required field {name!r} is missing")
            value = default
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelLoadError(f"{self.source}: {name} must be a positive integer, got {value!r}")
        return value

    def positive_float(self, name: str, default: float) -> float:
        value = self.raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ModelLoadError(f"{self.source}: {name} must be a positive number, got {value!r}")
        return float(value)


def _architecture(raw: dict[str, Any], source: str) -> str:
    archs = raw.get("architectures") or []
    if archs:
        arch = archs[0]
        if arch not in ARCHITECTURES:
            raise ModelLoadError(
                f"{source}: architecture {arch!r} is not supported; "
                f"supported: {', '.join(ARCHITECTURES)}"
            )
        return arch
    model_type = raw.get("model_type")
    if model_type not in _MODEL_TYPES:
        raise ModelLoadError(
            f"{source}: model_type {model_type!r} is not supported (and 'architectures' is "
            f"missing); supported: {', '.join(_MODEL_TYPES)}"
        )
    return _MODEL_TYPES[model_type]


def _rope(raw: dict[str, Any], source: str) -> RopeConfig:
    params = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    if not isinstance(params, dict):
        raise ModelLoadError(f"{source}: rope_parameters must be an object, got {params!r}")
    if "full_attention" in params:  # per-layer-type rope (transformers 5); ours is uniform
        params = params["full_attention"]
    rope_type = params.get("rope_type") or params.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise ModelLoadError(
            f"{source}: rope type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
        )
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ModelLoadError(f"{source}: partial_rotary_factor != 1 is not supported")
    theta = params.get("rope_theta", raw.get("rope_theta", 10000.0))
    try:
        if rope_type == "default":
            return RopeConfig(theta=float(theta))
        if rope_type == "linear":
            return RopeConfig(theta=float(theta), type="linear", factor=float(params["factor"]))
        return RopeConfig(
            theta=float(theta),
            type="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]),
        )
    except KeyError as e:
        raise ModelLoadError(f"{source}: {rope_type} rope parameters lack {e.args[0]!r}") from e


def _sliding_window(raw: dict[str, Any], family: str, source: str) -> int | None:
    window = raw.get("sliding_window")
    uses_window = (
        (family in ("mistral", "mixtral") and window is not None)
        or bool(raw.get("use_sliding_window"))
        or "sliding_attention" in (raw.get("layer_types") or [])
    )
    if not uses_window or window is None:
        return None
    if not isinstance(window, int) or window <= 0:
        raise ModelLoadError(f"{source}: sliding_window must be a positive integer, got {window!r}")
    return window
