"""`pegboard serve --dp-size N`: what each replica is started with — the user's own flags,
rebuilt from the parsed command line, and its share of the GPUs (`--tp-size` GPUs each)."""

from __future__ import annotations

import pytest
from pegboard.core.cli.main import build_parser
from pegboard.core.router.replicas import gpu_partition, replica_argv


def parse(*argv: str):
    return build_parser().parse_args(["serve", *argv])


def test_a_replica_gets_the_flags_the_user_gave_and_not_the_launchers_own():
    args = parse(
        "--model", "/m", "--dp-size", "2", "--port", "9000", "--kv-cache", "radix",
        "--disable-cuda-graph", "--patch", "a", "--patch", "b", "--metrics", "jsonl",
        "--router-policy", "cache_aware",
    )  # fmt: skip
    argv = replica_argv(args)
    assert argv[3] == "serve"
    flags = argv[4:]
    assert flags[flags.index("--model") + 1] == "/m"
    assert flags[flags.index("--kv-cache") + 1] == "radix"
    assert "--disable-cuda-graph" in flags
    assert [flags[i + 1] for i, f in enumerate(flags) if f == "--patch"] == ["a", "b"]
    assert flags[flags.index("--metrics") + 1] == "jsonl"
    assert "--dp-size" not in flags and "--port" not in flags  # set per replica
    assert "--max-num-batched-tokens" not in flags  # not given: the replica's own default


def test_replicas_split_the_visible_gpus_by_tensor_parallel_size(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert gpu_partition("auto", 2, 1) == [["0"], ["1"]]
    assert gpu_partition("cuda", 2, 4) == [["0", "1", "2", "3"], ["4", "5", "6", "7"]]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6")
    assert gpu_partition("auto", 3, 1) == [["3"], ["5"], ["6"]]
    with pytest.raises(ValueError, match="needs 4 GPUs; 3 visible"):
        gpu_partition("auto", 2, 2)
    with pytest.raises(ValueError, match="CUDA_VISIBLE_DEVICES"):
        gpu_partition("cuda:1", 2, 1)
    assert gpu_partition("cpu", 2, 1) is None
