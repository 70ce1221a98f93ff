"""Model loading: our own decoder implementation (Llama, Qwen2, Qwen3, Mistral) filled from
local HuggingFace safetensors checkpoints, running on a paged KV cache."""

from pegboard.core.models.config import ARCHITECTURES, ModelConfig, RopeConfig
from pegboard.core.models.errors import ModelLoadError
from pegboard.core.models.llama import CausalLM
from pegboard.core.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype

__all__ = [
    "ARCHITECTURES",
    "CausalLM",
    "LoadedModel",
    "ModelConfig",
    "ModelLoadError",
    "RopeConfig",
    "load_model",
    "resolve_device",
    "resolve_dtype",
]
