"""`pegboard generate`: the command-line completion, and clean errors for bad input."""

from __future__ import annotations

import subprocess
import sys

from pegboard.core.cli.main import main
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams


def pegboard(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pegboard.core.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_generate_prints_prompt_and_the_engines_greedy_completion(tiny_llama_dir):
    prompt = "the quick brown fox"
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu") as llm:
        expected = llm.generate([prompt], SamplingParams(max_tokens=8, temperature=0))[0].text
    done = pegboard(
        "generate",
        prompt,
        "--model",
        str(tiny_llama_dir),
        "--max-tokens",
        "8",
        "--dtype",
        "float32",
        "--device",
        "cpu",
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == prompt + expected + "\n"


def in_process(capsys, *args: str) -> tuple[int, str]:
    """`pegboard ARGS` run in this process (usage errors come before any model loads, as in a
    process of its own; an error that escaped as a traceback would fail the test): the exit
    status and stderr."""
    try:
        status = main(list(args))
    except SystemExit as e:  # argparse's own errors
        status = e.code
    return status, capsys.readouterr().err


def test_unknown_plugin_is_a_clear_error_before_the_model_loads(tiny_llama_dir, capsys):
    status, stderr = in_process(
        capsys, "generate", "hi", "--model", str(tiny_llama_dir), "--scheduler", "nope"
    )
    assert status == 2
    assert "unknown scheduler 'nope'; available: fcfs (pegboard" in stderr
    assert "Traceback" not in stderr
    assert "Loading weights" not in stderr


def test_bad_plugin_option_names_the_field(tiny_llama_dir, capsys):
    status, stderr = in_process(
        capsys, "generate", "hi", "--model", str(tiny_llama_dir),
        "--scheduler", "sjf", "--sjf-max-wait-steps", "-3",
    )  # fmt: skip
    assert status == 2
    assert "max_wait_steps" in stderr and "Traceback" not in stderr


def test_missing_model_directory_is_a_clear_error(tmp_path, capsys):
    status, stderr = in_process(capsys, "generate", "hi", "--model", str(tmp_path / "nowhere"))
    assert status == 2
    assert "does not exist" in stderr and "Traceback" not in stderr
