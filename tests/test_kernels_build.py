"""`pegboard kernels build`: which FlashInfer kernels a config needs, the errors a user can
make, the build environment it sets up, and the output directory it writes. Compiling itself
(1-4 minutes a kernel) is replaced by a stand-in child process here; the real kernels are
built by hand and checked on the GPU (docs/kernels.md)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest
from pegboard.core.cli.main import main

pytest.importorskip("flashinfer", reason="flashinfer-python is not installed")

from pegboard.plugins.kernels import flashinfer_kernels as fk  # noqa: E402

DECODE_128 = (
    "batch_decode_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_"
    "head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False"
)
PREFILL_128 = (
    "batch_prefill_with_kv_cache_dtype_q_bf16_dtype_kv_bf16_dtype_o_bf16_dtype_idx_i32_"
    "head_dim_qk_128_head_dim_vo_128_posenc_0_use_swa_False_use_logits_cap_False_f16qk_False"
)


def kernels_json(capsys, *args: str) -> list[dict]:
    assert main(["kernels", "build", "--dry-run", "--json", *args]) == 0
    out = capsys.readouterr().out
    return json.loads(out[: out.rindex("]") + 1])


def test_dry_run_names_the_decode_and_fa2_prefill_kernels_of_a_config(capsys, tmp_path):
    out = tmp_path / "k"
    kernels = kernels_json(capsys, "--arch", "9.0a", "--config", "qwen3-0.6b", "--out", str(out))
    assert [(k["kind"], k["name"]) for k in kernels] == [
        ("decode", DECODE_128),
        ("prefill", PREFILL_128),
    ]
    assert not out.exists()  # a dry run writes nothing


def test_fp8_kv_pools_add_their_e4m3_decode_and_prefill_kernels(capsys, tmp_path):
    kernels = kernels_json(
        capsys, "--arch", "9.0a", "--config", "qwen3-0.6b", "--config", "llama-3.1-8b",
        "--kv-cache-dtype", "auto", "--kv-cache-dtype", "fp8_e4m3", "--out", str(tmp_path),
    )  # fmt: skip
    fp8 = [k for k in kernels if k["kv_dtype"] == "float8_e4m3fn"]
    assert [k["name"] for k in kernels if k not in fp8] == [DECODE_128, PREFILL_128]
    assert [k["name"] for k in fp8] == [
        DECODE_128.replace("dtype_kv_bf16", "dtype_kv_e4m3"),
        PREFILL_128.replace("dtype_kv_bf16", "dtype_kv_e4m3"),
    ]
    only_fp8 = kernels_json(
        capsys, "--arch", "9.0a", "--config", "qwen3-0.6b", "--kv-cache-dtype", "fp8",
        "--out", str(tmp_path),
    )  # fmt: skip
    assert [k["name"] for k in only_fp8] == [k["name"] for k in fp8]


def test_configs_with_the_same_head_size_share_their_kernels(capsys, tmp_path):
    # all bundled: Qwen3-0.6B, Qwen2.5-7B, Qwen3-30B-A3B and Llama-3.1-8B at head size 128,
    # SmolLM2-135M (the default model's architecture) at 64
    kernels = kernels_json(capsys, "--arch", "9.0a", "--out", str(tmp_path))
    head_64 = [name.replace("_128_", "_64_") for name in (DECODE_128, PREFILL_128)]
    assert [k["name"] for k in kernels] == [DECODE_128, PREFILL_128, *head_64]


def test_a_config_file_with_another_head_size_and_float16(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"hidden_size": 2048, "num_attention_heads": 32}))
    kernels = kernels_json(
        capsys, "--arch", "9.0a", "--config", str(config), "--dtype", "float16",
        "--out", str(tmp_path / "k"),
    )  # fmt: skip
    assert {k["head_dim"] for k in kernels} == {64}
    assert all("dtype_q_f16" in k["name"] and "head_dim_qk_64" in k["name"] for k in kernels)


def test_the_plain_listing_names_each_kernel(capsys, tmp_path):
    args = ["kernels", "build", "--arch", "9.0a", "--config", "llama-3.1-8b", "--dry-run"]
    assert main([*args, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "2 FlashInfer kernels for llama-3.1-8b (bfloat16, 9.0a)" in out
    assert DECODE_128 in out and PREFILL_128 in out
    assert main([*args, "--kv-cache-dtype", "fp8_e4m3", "--out", str(tmp_path)]) == 0
    assert "(bfloat16, KV fp8_e4m3, 9.0a)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["--arch", "sm90"], "is not a CUDA architecture like 9.0a"),
        (["--arch", "7.0"], "needs sm_75 or newer"),
        (["--arch", "9.0a", "--config", "gpt-9"], "unknown config 'gpt-9'.*qwen3-0.6b"),
        (["--arch", "9.0a", "--dtype", "float32"], "--dtype must be one of bfloat16, float16"),
        (
            ["--arch", "9.0a", "--kv-cache-dtype", "int4"],
            "--kv-cache-dtype must be auto or .*fp8_e4m3",
        ),
    ],
)
def test_user_errors_exit_2_with_the_reason(capsys, tmp_path, args, message):
    assert main(["kernels", "build", *args, "--out", str(tmp_path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pegboard kernels: error:")
    assert re.search(message, err), err


def test_a_config_whose_head_size_flashinfer_lacks_is_named(capsys, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"head_dim": 80, "hidden_size": 640, "num_attention_heads": 8}))
    args = ["--arch", "9.0a", "--config", str(config), "--out", str(tmp_path), "--dry-run"]
    assert main(["kernels", "build", *args]) == 2
    assert f"config {config}: FlashInfer's attention kernels support head sizes" in (
        capsys.readouterr().err
    )


# ------------------------------------------------------------------ build environment


def fake_cuda(root: Path, stubs: bool = False) -> Path:
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "nvcc").write_text("#!/bin/sh\n")
    (root / "lib64").mkdir()
    (root / "lib64" / "libcudart.so").write_bytes(b"")
    if stubs:
        (root / "lib64" / "stubs").mkdir()
        (root / "lib64" / "stubs" / "libcuda.so").write_bytes(b"")
    return root


def test_without_a_cuda_toolkit_the_build_names_what_it_checked(tmp_path):
    env = {"CUDA_HOME": str(tmp_path / "none"), "PATH": str(tmp_path)}
    with pytest.raises(fk.BuildError, match="no CUDA toolkit found.*checked .*none.*CUDA_HOME"):
        fk.find_cuda_home(env, standard=())


def test_an_nvcc_wrapper_script_is_not_taken_for_the_toolkit(monkeypatch, tmp_path):
    wrapper = tmp_path / "wrapper" / "bin"
    wrapper.mkdir(parents=True)
    (wrapper / "nvcc").write_text("#!/bin/sh\n")
    (wrapper / "nvcc").chmod(0o755)
    cuda = fake_cuda(tmp_path / "cuda")
    assert fk.find_cuda_home({"PATH": str(wrapper)}, standard=(str(cuda),)) == cuda


def test_the_build_environment_targets_the_arch_and_makes_a_libcuda_stub(monkeypatch, tmp_path):
    cuda = fake_cuda(tmp_path / "cuda")
    monkeypatch.setenv("CUDA_HOME", str(cuda))
    monkeypatch.delenv("LIBRARY_PATH", raising=False)
    env = fk.build_environment("9.0a", tmp_path / "work")
    assert env["FLASHINFER_CUDA_ARCH_LIST"] == "9.0a" and env["CUDA_HOME"] == str(cuda)
    assert env["FLASHINFER_WORKSPACE_BASE"] == str(tmp_path / "work")
    stub = Path(env["LIBRARY_PATH"].split(os.pathsep)[0]) / "libcuda.so"
    assert stub.is_file()
    dynamic = subprocess.run(["readelf", "-d", str(stub)], capture_output=True, text=True).stdout
    assert "libcuda.so.1" in dynamic  # the soname the GPU host's driver library has


def test_a_toolkit_with_a_libcuda_stub_needs_none_made(monkeypatch, tmp_path):
    cuda = fake_cuda(tmp_path / "cuda", stubs=True)
    monkeypatch.setenv("CUDA_HOME", str(cuda))
    monkeypatch.delenv("LIBRARY_PATH", raising=False)
    env = fk.build_environment("9.0a", tmp_path / "work")
    assert env["LIBRARY_PATH"] == "" and not (tmp_path / "work" / "libcuda-stub").exists()


# ------------------------------------------------------------------ the output directory


@pytest.fixture
def stand_in_compiler(monkeypatch, tmp_path):
    """Replace the child process that compiles a kernel by one that writes a dummy .so;
    records the kernels it was asked for."""
    asked = []
    real_run = subprocess.run

    def run(cmd, **kw):
        if cmd[1:3] != ["-m", fk.__name__]:
            return real_run(cmd, **kw)
        kernel, out = json.loads(cmd[3]), Path(cmd[4])
        asked.append(kernel["name"])
        assert kw["env"]["FLASHINFER_CUDA_ARCH_LIST"] == "9.0a"
        (out / kernel["name"]).mkdir(parents=True, exist_ok=True)
        (out / kernel["name"] / f"{kernel['name']}.so").write_bytes(b"so")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(fk.subprocess, "run", run)
    monkeypatch.setenv("CUDA_HOME", str(fake_cuda(tmp_path / "cuda", stubs=True)))
    return asked


def test_build_writes_each_kernel_where_flashinfer_looks_and_a_manifest(
    stand_in_compiler, tmp_path, capsys
):
    import flashinfer

    out = tmp_path / "kernels"
    assert (
        main(["kernels", "build", "--arch", "9.0a", "--config", "qwen3-0.6b", "--out", str(out)])
        == 0
    )
    assert stand_in_compiler == [DECODE_128, PREFILL_128]
    for name in (DECODE_128, PREFILL_128):
        assert (out / name / f"{name}.so").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["flashinfer"] == flashinfer.__version__ and manifest["arch"] == "9.0a"
    assert [k["name"] for k in manifest["kernels"]] == [DECODE_128, PREFILL_128]
    assert "compiled 2, 0 already there (0.0 MiB of .so for these)" in capsys.readouterr().out


def test_a_second_build_compiles_only_what_is_missing(stand_in_compiler, tmp_path):
    out = tmp_path / "kernels"
    kernels = fk.required_kernels(128, fk.DTYPES["bfloat16"])
    fk.build(kernels[:1], out, "9.0a", log=lambda m: None)
    assert fk.build(kernels, out, "9.0a", log=lambda m: None) == kernels[1:]
    assert fk.build(kernels, out, "9.0a", force=True, log=lambda m: None) == kernels
    assert stand_in_compiler == [DECODE_128, PREFILL_128, DECODE_128, PREFILL_128]


def test_a_directory_built_for_another_arch_is_not_mixed_into(stand_in_compiler, tmp_path):
    out = tmp_path / "kernels"
    kernels = fk.required_kernels(128, fk.DTYPES["bfloat16"])
    fk.build(kernels, out, "9.0a", log=lambda m: None)
    with pytest.raises(fk.BuildError, match="built for arch 9.0a, not 8.0"):
        fk.build(kernels, out, "8.0", log=lambda m: None)


def test_a_failed_compile_exits_2_with_its_output_and_what_to_install(
    monkeypatch, tmp_path, capsys
):
    def run(cmd, **kw):
        return subprocess.CompletedProcess(cmd, 1, "", "fatal error: cublas_v2.h: No such file")

    monkeypatch.setattr(fk.subprocess, "run", run)
    monkeypatch.setenv("CUDA_HOME", str(fake_cuda(tmp_path / "cuda", stubs=True)))
    args = ["kernels", "build", "--arch", "9.0a", "--config", "qwen3-0.6b"]
    assert main([*args, "--out", str(tmp_path / "k")]) == 2
    err = capsys.readouterr().err
    assert f"compiling {DECODE_128} failed" in err and "cublas_v2.h: No such file" in err
    assert "pip install nvidia-cublas" in err
