"""`pegboard generate`: the command-line completion, and clean errors for bad input."""

from __future__ import annotations

import subprocess
import sys

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


def test_unknown_plugin_is_a_clear_error_before_the_model_loads(tiny_llama_dir):
    done = pegboard("generate", "hi", "--model", str(tiny_llama_dir), "--scheduler", "nope")
    assert done.returncode == 2
    assert "unknown scheduler 'nope'; available: fcfs (pegboard" in done.stderr
    assert "Traceback" not in done.stderr
    assert "Loading weights" not in done.stderr


def test_bad_plugin_option_names_the_field(tiny_llama_dir):
    done = pegboard(
        "generate",
        "hi",
        "--model",
        str(tiny_llama_dir),
        "--scheduler",
        "sjf",
        "--sjf-max-wait-steps",
        "-3",
    )
    assert done.returncode == 2
    assert "max_wait_steps" in done.stderr and "Traceback" not in done.stderr


def test_missing_model_directory_is_a_clear_error(tmp_path):
    done = pegboard("generate", "hi", "--model", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr
