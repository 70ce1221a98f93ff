"""Reading safetensors checkpoints (single file or sharded) into a `CausalLM`'s parameters.

Tensors are read straight onto the target device and cast into the (possibly fused) parameter
they belong to, one at a time, so peak memory stays near the model's own size.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from pegboard.core.models.errors import ModelLoadError
from pegboard.core.models.layers import MergedLinear
from pegboard.sdk.linear import LinearLayer, QuantizationError
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm

INDEX_FILE = "model.safetensors.index.json"
#: Checkpoint entries that carry no weights (rope tables some exporters saved).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
#: Per-layer KV cache scales of FP8-KV checkpoints (llm-compressor / vLLM names).
_KV_SCALE = re.compile(r"model\.layers\.(\d+)\.self_attn\.(k_scale|v_scale|kv_scale)")


@dataclass
class TensorTarget:
    """Where one checkpoint tensor goes: rows `[start, start + rows)` of `param`, or all of it."""

    param: nn.Parameter
    start: int = 0
    rows: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        if self.rows is None:
            return tuple(self.param.shape)
        return (self.rows, *self.param.shape[1:])

    def view(self) -> torch.Tensor:
        data = self.param.data
        return data if self.rows is None else data[self.start : self.start + self.rows]


def checkpoint_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a checkpoint, from its shard index when there is one."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ModelLoadError(f"{index} is not a valid shard index: {e!r}") from e
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise ModelLoadError(f"{f} is listed in {INDEX_FILE} but missing")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in model_dir.glob("*.bin")) or ["no weight files"]
        raise ModelLoadError(
            f"{model_dir} has no *.safetensors weights (found: {', '.join(found)}); "
            "only safetensors checkpoints are supported"
        )
    return files


@dataclass
class LayerTarget:
    """A checkpoint tensor a linear layer takes itself (`LinearLayer.load_tensor`): quantized
    weights, whose names, packing and completeness the layer knows."""

    layer: LinearLayer
    shard: str
    suffix: str


def checkpoint_targets(
    model: nn.Module, tied_lm_head: bool
) -> dict[str, TensorTarget | LayerTarget]:
    """Map each checkpoint tensor name to the parameter (and rows) it fills, or to the linear
    layer that reads it."""
    targets: dict[str, TensorTarget | LayerTarget] = {}
    for prefix, module in model.named_modules():
        parent = prefix.rpartition(".")[0]
        if hasattr(module, "checkpoint_targets"):  # stacked MoE experts name their own tensors
            targets.update(module.checkpoint_targets(prefix))
            continue
        if isinstance(module, LinearLayer) and not module.loads_by_parameter:
            for shard in module.spec.shard_sizes:
                for suffix in module.tensor_suffixes:
                    name = f"{parent}.{shard}.{suffix}" if parent else f"{shard}.{suffix}"
                    targets[name] = LayerTarget(module, shard, suffix)
            continue
        for pname, param in module.named_parameters(recurse=False):
            if isinstance(module, MergedLinear):
                for shard, (start, rows) in module.shards.items():
                    name = f"{parent}.{shard}.{pname}" if parent else f"{shard}.{pname}"
                    targets[name] = TensorTarget(param, start, rows)
            else:
                targets[f"{prefix}.{pname}" if prefix else pname] = TensorTarget(param)
    if tied_lm_head:
        targets.pop("lm_head.weight", None)
    return targets


def load_checkpoint(
    model: nn.Module,
    model_dir: Path,
    device: torch.device,
    tied_lm_head: bool,
    progress: bool,
    shard=None,
    gguf: Path | None = None,
    cfg=None,
) -> None:
    """Fill every parameter of `model` from the checkpoint in `model_dir` (with `shard`, a
    `pegboard.core.distributed.sharding.ModelShard`: this rank's slice of each tensor).

    Raises `ModelLoadError` naming the file and tensor for a corrupt file, an unexpected or
    missing tensor, or a shape that disagrees with the config; a quantized layer's missing or
    misshapen tensors are reported by the layer, named. With `gguf` (and the model's `cfg`),
    the weights come from that GGUF file instead of safetensors."""
    targets = checkpoint_targets(model, tied_lm_head)
    if gguf is not None:
        from pegboard.core.models.gguf_source import GGUFSource

        files, handles = [gguf], [GGUFSource(gguf, cfg, device)]
    else:
        files = checkpoint_files(model_dir)
        handles = [_open(f, device) for f in files]
    total = sum(len(list(h.keys())) for h in handles)
    loaded: set[str] = set()
    with tqdm(total=total, desc="Loading weights", unit="tensor", disable=not progress) as bar:
        for path, handle in zip(files, handles):
            for name in handle.keys():
                bar.update(1)
                if tied_lm_head and name == "lm_head.weight":
                    continue  # the embedding serves as the head
                if name.endswith(_IGNORED_SUFFIXES):
                    continue
                if _read_kv_scale(model, name, handle):
                    continue
                target = targets.get(name)
                if target is None:
                    raise ModelLoadError(
                        f"{path}: unexpected tensor {name!r}; this checkpoint has weights the "
                        f"{type(model).__name__} implementation does not use"
                    )
                if isinstance(target, LayerTarget):
                    _give(path, name, handle, target)
                else:
                    _copy(path, name, handle, target, shard)
                loaded.add(name)
    _finish_layers(model_dir, targets)
    missing = [n for n, t in targets.items() if n not in loaded and isinstance(t, TensorTarget)]
    if missing:
        shown = ", ".join(missing[:5]) + (
            f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        )
        raise ModelLoadError(f"{model_dir}: missing tensor(s) {shown}")


def _read_kv_scale(model: nn.Module, name: str, handle) -> bool:
    """Keep a checkpoint's per-layer KV scale in `model.kv_scales[layer]` (for an FP8 pool)."""
    m = _KV_SCALE.fullmatch(name)
    if m is None or not hasattr(model, "kv_scales"):
        return False
    value = float(handle.get_tensor(name).float().reshape(-1)[0])
    kinds = ("k", "v") if m.group(2) == "kv_scale" else (m.group(2)[0],)
    for kind in kinds:
        model.kv_scales.setdefault(int(m.group(1)), {})[kind] = value
    return True


def _give(path: Path, name: str, handle, target: LayerTarget) -> None:
    try:
        tensor = handle.get_tensor(name)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read tensor {name!r}: {e}") from e
    target.layer.load_tensor(target.shard, target.suffix, tensor)


def _finish_layers(model_dir: Path, targets: dict[str, TensorTarget | LayerTarget]) -> None:
    """Let every self-loading linear layer check and convert what it received."""
    layers = {id(t.layer): t.layer for t in targets.values() if isinstance(t, LayerTarget)}
    for layer in layers.values():
        try:
            layer.finish_loading()
        except QuantizationError as e:
            raise ModelLoadError(
                f"{model_dir}: {e} (layer {layer.spec.name}, linear plugin "
                f"{type(layer).__module__})"
            ) from e


def _open(path: Path, device: torch.device):
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except Exception as e:  # safetensors raises its own error type or OSError on bad files
        raise ModelLoadError(f"{path} is not a readable safetensors file: {e}") from e


def _copy(path: Path, name: str, handle, target: TensorTarget, shard=None) -> None:
    try:
        shape = tuple(handle.get_slice(name).get_shape())
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read tensor {name!r}: {e}") from e
    if shard is not None:
        shape = shard.local_shape(name, shape)
    if shape != target.shape:
        raise ModelLoadError(
            f"{path}: tensor {name!r} has shape {list(shape)} but the config implies "
            f"{list(target.shape)}"
        )
    try:
        tensor = handle.get_tensor(name) if shard is None else shard.read(handle, name)
    except Exception as e:
        raise ModelLoadError(f"{path}: cannot read tensor {name!r}: {e}") from e
    target.view().copy_(tensor)
