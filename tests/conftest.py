"""Shared fixtures: tiny HF checkpoints of every supported architecture, built once per session.

Builders live in `tests/fixtures` (`from fixtures import build_tiny_model, PageAllocator`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Without a GPU, Triton runs in its CPU interpreter. Set before any test module (or a
    # library such as flashinfer) imports triton, so a subset of the suite runs as the whole
    # suite does (a kernel test module used to set it during collection, too late for a module
    # collected before it that imported triton: test_kernels_build + test_speculative_graphs).
    os.environ.setdefault("TRITON_INTERPRET", "1")
    if os.environ["TRITON_INTERPRET"] == "1":  # (no per-call re-patching: a third faster)
        from fixtures.interpreter_speed import speed_up_nested_calls

        speed_up_nested_calls()

from fixtures import ARCHS, build_tiny_model  # noqa: E402


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """arch -> directory of a tiny random checkpoint (llama: llama3 rope scaling; qwen2: qkv
    bias, tied embeddings; qwen3: q/k norm, head_dim 32; mistral: sliding window 256)."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: build_tiny_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="session")
def tiny_llama_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["qwen2"]


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["qwen3"]


@pytest.fixture(scope="session")
def tiny_mistral_dir(tiny_model_dirs: dict[str, Path]) -> Path:
    return tiny_model_dirs["mistral"]


@pytest.fixture
def decode_configs(monkeypatch: pytest.MonkeyPatch) -> dict:
    """An empty `gemv.DECODE_CONFIGS` (the GEMV's launch table) for a test to fill."""
    from pegboard.core.kernels import gemv  # not at the top: a test module sets TRITON_INTERPRET

    table: dict = {}
    monkeypatch.setattr(gemv, "DECODE_CONFIGS", table)
    return table
