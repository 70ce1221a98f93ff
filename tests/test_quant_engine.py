"""The `linear` slot in the engine: a quantized checkpoint is served by `w4a16` without a flag
and generates what its de-quantized weights generate; bad quantized checkpoints and bad
selections fail before serving starts, with errors naming the layer, tensor or plugin."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import build_tiny_model
from fixtures.quantized import quantize_checkpoint
from pegboard.core.llm import LLM
from pegboard.core.models import ModelLoadError
from pegboard.core.swap import SwapError
from pegboard.sdk.types import SamplingParams
from safetensors.torch import load_file, save_file

PROMPTS = [[5, 9, 30, 41, 7], [100, 3, 64, 12, 12, 90, 17]]


@pytest.fixture(scope="module")
def gptq_dirs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("engine-quant")
    src = build_tiny_model(root / "llama", "llama", hidden_size=128, intermediate_size=256)
    return quantize_checkpoint(src, root / "gptq", "gptq", group_size=64, sym=False)


def greedy(model_dir: Path, **settings) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model_dir), dtype="float32", device="cpu", **settings)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    return [o.token_ids for o in outs], llm


def test_quantized_checkpoint_is_served_by_w4a16_and_matches_its_dequantized_run(gptq_dirs):
    q_dir, deq_dir = gptq_dirs
    got, llm = greedy(q_dir)
    assert llm.engine.plugins.active("linear").name == "w4a16"
    layer = llm.engine.runner.model.model.layers[0].self_attn.qkv_proj
    assert layer.qweight is not None  # 4-bit weights, not a de-quantized copy
    expected, plain = greedy(deq_dir)
    assert plain.engine.plugins.active("linear").name == "bf16"
    assert got == expected


def test_the_linear_slot_is_listed_with_both_plugins():
    from pegboard.core.plugin_manager import PluginManager

    names = {i.name for i in PluginManager().list_plugins() if i.slot == "linear"}
    assert {"bf16", "w4a16"} <= names


def test_linear_slot_cannot_be_swapped_at_runtime(gptq_dirs):
    _, llm = greedy(gptq_dirs[0])
    future = llm.swap("linear", "bf16")
    llm.engine.step()
    with pytest.raises(SwapError, match="cannot be swapped at runtime"):
        future.result(timeout=0)
    assert llm.engine.plugins.active("linear").name == "w4a16"


def test_dense_plugin_on_a_quantized_checkpoint_is_refused_naming_it(gptq_dirs):
    with pytest.raises(ModelLoadError, match="linear plugin 'bf16' cannot read gptq"):
        LLM(str(gptq_dirs[0]), dtype="float32", device="cpu", linear="bf16")


def test_quantization_flag_that_contradicts_config_json_is_refused(gptq_dirs):
    with pytest.raises(ModelLoadError, match="--quantization awq but .* says gptq"):
        LLM(str(gptq_dirs[0]), dtype="float32", device="cpu", quantization="awq")


def _edited_copy(q_dir: Path, tmp_path: Path, config=None, drop: str | None = None) -> Path:
    import shutil

    out = tmp_path / "edited"
    shutil.copytree(q_dir, out)
    if config is not None:
        raw = json.loads((out / "config.json").read_text())
        raw["quantization_config"].update(config)
        (out / "config.json").write_text(json.dumps(raw))
    if drop is not None:
        state = load_file(out / "model.safetensors")
        del state[drop]
        save_file(state, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"bits": 8}, "8-bit weights are not supported"),
        ({"group_size": 48}, "group size 48 is not supported"),
        ({"quant_method": "bitsandbytes"}, "quant_method 'bitsandbytes' is not supported"),
    ],
)
def test_unsupported_quantization_fails_before_serving(gptq_dirs, tmp_path, change, message):
    model_dir = _edited_copy(gptq_dirs[0], tmp_path, config=change)
    with pytest.raises(ModelLoadError, match=message):
        LLM(str(model_dir), dtype="float32", device="cpu")


def test_missing_quantized_tensor_is_named(gptq_dirs, tmp_path):
    name = "model.layers.1.self_attn.k_proj.qzeros"
    model_dir = _edited_copy(gptq_dirs[0], tmp_path, drop=name)
    with pytest.raises(ModelLoadError, match=f"missing tensor {name}.*w4a16"):
        LLM(str(model_dir), dtype="float32", device="cpu")


def test_misshapen_quantized_tensor_is_named(gptq_dirs, tmp_path):
    name = "model.layers.0.mlp.down_proj.scales"
    model_dir = _edited_copy(gptq_dirs[0], tmp_path)
    state = load_file(model_dir / "model.safetensors")
    state[name] = state[name][:-1].clone()
    save_file(state, str(model_dir / "model.safetensors"))
    with pytest.raises(ModelLoadError, match=f"tensor {name} has shape"):
        LLM(str(model_dir), dtype="float32", device="cpu")


def test_dummy_weights_in_a_quantized_layout_for_benchmarks(tmp_path):
    src = build_tiny_model(tmp_path / "llama", "llama", hidden_size=128, intermediate_size=256)
    llm = LLM(str(src), dtype="float32", device="cpu", load_format="dummy", quantization="gptq")
    layer = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert layer.qweight is not None and layer.group_size == 128
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=3, temperature=0.0))
    assert len(out[0].token_ids) == 3
    assert torch.isfinite(layer(torch.randn(2, 256))).all()


def _config_dir(tmp_path: Path, quantization_config: dict) -> Path:
    (tmp_path / "config.json").write_text(json.dumps({"quantization_config": quantization_config}))
    return tmp_path


def _ct(weights: dict, **group) -> dict:
    base = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {"g": {"targets": ["Linear"], "weights": {**base, **weights}, **group}},
    }


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"quant_method": "gptq", "bits": 4, "checkpoint_format": "marlin"},
         "checkpoint_format 'marlin'; only gptq and gptq_v2"),
        ({"quant_method": "awq", "bits": 4, "version": "gemv"}, "AWQ version 'gemv'"),
        (_ct({"strategy": "tensor"}), "weight strategy 'tensor'"),
        (_ct({}, input_activations={"num_bits": 8}), "quantized activations"),
        ({**_ct({}), "format": "float-quantized", "config_groups": {"g": {
            "format": "float-quantized", "weights": {"num_bits": 8}}}},
         "format 'float-quantized'; only pack-quantized"),
    ],
    ids=["gptq-marlin-format", "awq-gemv", "ct-tensor-strategy", "ct-w4a8", "ct-fp8"],
)  # fmt: skip
def test_unsupported_quantization_configs_are_named_before_any_weight_is_read(
    tmp_path, config, message
):
    from pegboard.core.models.quantization import detect_quantization

    with pytest.raises(ModelLoadError, match=message):
        detect_quantization(_config_dir(tmp_path, config), None)


def test_gguf_flag_without_a_gguf_file_is_refused(tmp_path):
    from pegboard.core.models.quantization import detect_quantization

    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelLoadError, match=r"--quantization gguf: no \*.gguf file"):
        detect_quantization(tmp_path, "gguf")


def test_gptq_activation_order_without_g_idx_is_named(gptq_dirs, tmp_path):
    model_dir = _edited_copy(gptq_dirs[0], tmp_path, config={"desc_act": True})
    with pytest.raises(ModelLoadError, match=r"missing tensor model\.layers\.0\..*g_idx"):
        LLM(str(model_dir), dtype="float32", device="cpu")
