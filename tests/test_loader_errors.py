"""Every way a model directory can be unusable gives a `ModelLoadError` naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from pegboard.core.models import ModelLoadError, load_model
from safetensors.torch import load_file, save_file


@pytest.fixture
def model_dir(tmp_path: Path, tiny_llama_dir: Path) -> Path:
    """A private copy of the tiny Llama checkpoint that a test may damage."""
    return Path(shutil.copytree(tiny_llama_dir, tmp_path / "model"))


def edit_config(model_dir: Path, **changes) -> None:
    path = model_dir / "config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(json.dumps(config))


def edit_weights(model_dir: Path, edit) -> None:
    path = model_dir / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def load(model_dir: Path, **kwargs):
    return load_model(model_dir, progress=False, **kwargs)


def test_missing_directory(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load(tmp_path / "nowhere")


def test_missing_config(model_dir):
    (model_dir / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json is missing"):
        load(model_dir)


def test_config_is_not_json(model_dir):
    (model_dir / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match=r"config\.json is not valid JSON"):
        load(model_dir)


def test_unsupported_architecture(model_dir):
    edit_config(model_dir, architectures=["GPT2LMHeadModel"], model_type="gpt2")
    with pytest.raises(ModelLoadError, match="'GPT2LMHeadModel' is not supported"):
        load(model_dir)


def test_architecture_from_model_type_when_architectures_is_absent(model_dir):
    edit_config(model_dir, architectures=None)
    assert load(model_dir).info.architecture == "LlamaForCausalLM"


def test_missing_required_field(model_dir):
    edit_config(model_dir, hidden_size=None)
    with pytest.raises(ModelLoadError, match="'hidden_size' is missing"):
        load(model_dir)


def test_heads_not_divisible_by_kv_heads(model_dir):
    edit_config(model_dir, num_key_value_heads=3)
    with pytest.raises(ModelLoadError, match="not a multiple of num_key_value_heads"):
        load(model_dir)


def test_unsupported_rope_type(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})
    with pytest.raises(ModelLoadError, match="rope type 'yarn' is not supported"):
        load(model_dir)


def test_llama3_rope_without_its_parameters(model_dir):
    edit_config(model_dir, rope_parameters={"rope_type": "llama3", "factor": 8.0})
    with pytest.raises(ModelLoadError, match="lack 'low_freq_factor'"):
        load(model_dir)


def test_unsupported_activation(model_dir):
    edit_config(model_dir, hidden_act="gelu")
    with pytest.raises(ModelLoadError, match="hidden_act 'gelu'"):
        load(model_dir)


def test_no_safetensors_weights(model_dir):
    (model_dir / "model.safetensors").rename(model_dir / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match=r"no \*\.safetensors weights.*pytorch_model\.bin"):
        load(model_dir)


def test_corrupt_safetensors(model_dir):
    (model_dir / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match=r"model\.safetensors is not a readable safetensors"):
        load(model_dir)


def test_truncated_safetensors(model_dir):
    path = model_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors is not a readable.*not fully covered"
    ):
        load(model_dir)


def test_missing_tensor(model_dir):
    edit_weights(model_dir, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    with pytest.raises(
        ModelLoadError, match=r"missing tensor\(s\) model\.layers\.1\.self_attn\.k_proj"
    ):
        load(model_dir)


def test_unexpected_tensor(model_dir):
    edit_weights(
        model_dir, lambda t: t.update({"model.layers.0.mlp.gate_proj.bias": torch.zeros(128)})
    )
    with pytest.raises(
        ModelLoadError, match=r"unexpected tensor 'model\.layers\.0\.mlp\.gate_proj\.bias'"
    ):
        load(model_dir)


def test_shape_mismatch_names_tensor_and_shapes(model_dir):
    name = "model.layers.0.self_attn.o_proj.weight"
    edit_weights(model_dir, lambda t: t.update({name: torch.zeros(64, 32)}))
    with pytest.raises(
        ModelLoadError,
        match=r"'model\.layers\.0\.self_attn\.o_proj\.weight' has shape \[64, 32\] "
        r"but the config implies \[64, 64\]",
    ):
        load(model_dir)


def test_shard_index_naming_a_missing_file(model_dir):
    index = {
        "metadata": {},
        "weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"},
    }
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors is listed"):
        load(model_dir)


def test_unknown_dtype(model_dir):
    with pytest.raises(ModelLoadError, match="dtype 'int8' is not supported"):
        load(model_dir, dtype="int8")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_requested_without_a_gpu(model_dir):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load(model_dir, device="cuda")


def test_odd_head_dim_cannot_carry_rope(model_dir):
    edit_config(model_dir, head_dim=15)
    with pytest.raises(ModelLoadError, match="head_dim 15 is odd"):
        load(model_dir)
