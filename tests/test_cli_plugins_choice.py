"""`pegboard plugins` marks each slot's default and active choice and shows plugins that cannot
run on this machine as unavailable, with the reason (issue 10, item 19)."""

from __future__ import annotations

import json

import pytest
import torch
from pegboard.core.cli.main import main
from pegboard.core.plugin_manager import PluginManager
from pegboard.sdk import Sampler

ON_CUDA = torch.cuda.is_available()


def listed(capsys, *flags: str) -> dict[tuple[str, str], dict]:
    assert main(["plugins", "--json", *flags]) == 0
    return {(p["slot"], p["name"]): p for p in json.loads(capsys.readouterr().out)["plugins"]}


def test_each_slot_marks_its_default_and_the_flags_mark_the_active_choice(capsys):
    plugins = listed(capsys, "--scheduler", "sjf", "--metrics", "prometheus")
    fcfs, sjf = plugins[("scheduler", "fcfs")], plugins[("scheduler", "sjf")]
    assert (fcfs["default"], fcfs["active"]) == (True, False)
    assert (sjf["default"], sjf["active"]) == (False, True)
    paged = plugins[("kv_cache", "paged")]
    assert paged["default"] and paged["active"]  # no flag: the default is the active choice
    assert plugins[("metrics", "prometheus")]["active"]
    assert not plugins[("metrics", "jsonl")]["active"]
    for slot in ("scheduler", "kv_cache", "attention", "sampler"):
        assert sum(p["default"] for (s, _), p in plugins.items() if s == slot) == 1, slot


@pytest.mark.skipif(ON_CUDA, reason="checks the listing of a machine without CUDA")
def test_gpu_only_backends_are_unavailable_with_the_reason_without_cuda(capsys, monkeypatch):
    # Kernel tests earlier in the session set TRITON_INTERPRET=1, which lets triton run on CPU.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    plugins = listed(capsys)
    for name in ("triton", "flashinfer"):
        record = plugins[("attention", name)]
        assert record["state"].startswith("unavailable: ") and not record["default"]
        assert record["unavailable"] in record["state"]
        assert "CUDA device" in record["unavailable"] or "not installed" in record["unavailable"]
    torch_backend = plugins[("attention", "torch")]
    assert torch_backend["state"] == "available" and torch_backend["default"]
    assert main(["plugins"]) == 0
    table = capsys.readouterr().out.splitlines()
    triton = next(line for line in table if line.split()[:2] == ["attention", "triton"])
    assert "unavailable: the triton attention backend needs a CUDA device" in triton


@pytest.mark.gpu
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")
def test_on_cuda_triton_is_the_attention_default_and_available(capsys):
    plugins = listed(capsys)
    assert plugins[("attention", "triton")]["default"]
    assert plugins[("attention", "triton")]["state"] == "available"
    assert not plugins[("attention", "torch")]["default"]


def test_a_plugin_class_declares_why_it_cannot_run_here():
    class NeedsTPU(Sampler):
        name = "tpu-sampler"

        @classmethod
        def unavailable(cls):
            return "needs a TPU"

    class BrokenCheck(Sampler):
        name = "broken-check"

        @classmethod
        def unavailable(cls):
            raise RuntimeError("probe crashed")

    pm = PluginManager(entry_points=False)
    assert pm.add(NeedsTPU).to_dict()["state"] == "unavailable: needs a TPU"
    assert pm.add(BrokenCheck).state == (
        "unavailable: its availability check raised RuntimeError: probe crashed"
    )
