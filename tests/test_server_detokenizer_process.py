"""A real `pegboard serve --detokenizer process` driven by the official client: streamed and
whole completions (stop strings, n > 1) equal the offline engine's with the inline detokenizer;
when the detokenizer process dies the open stream ends with an error naming it and the server
exits with status 3 (SGLang stops its server when its detokenizer dies); SIGTERM drains through
it and leaves no process behind."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import openai
import pytest
from fixtures.processes import detokenizer_children
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams
from test_server_drain import sigterm_under_load
from test_server_process import API_KEY, ServerProcess

PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    proc = ServerProcess(
        tiny_llama_dir,
        tmp_path_factory.mktemp("serve"),
        "--served-model-name", "tiny",
        "--api-key", API_KEY,
        "--detokenizer", "process",
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, str]:
    """Greedy texts of the offline engine with the inline detokenizer."""
    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu") as llm:
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
    return {p: o.text for p, o in zip(PROMPTS, outs)}


def gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")  # exited (a zombie until its new parent reaps it)


def detokenizer_pid(server_pid: int) -> int:
    """The server's detokenizer process (a child running `detokenizer_worker`)."""
    pids = detokenizer_children(server_pid)
    assert pids, f"no detokenizer process under pid {server_pid}"
    return pids[0]


def test_completions_stream_the_offline_text_with_stop_strings_and_n(server, reference):
    client = server.client()
    for prompt in PROMPTS:
        want = reference[prompt]
        stream = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream if c.choices) == want
        stop = want[4:7]
        out = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stop=[stop], n=2
        )
        cut = want[: want.index(stop)]
        assert [c.text for c in out.choices] == [cut, cut]
        assert [c.finish_reason for c in out.choices] == ["stop", "stop"]


def test_a_dead_detokenizer_fails_the_open_stream_naming_it_and_the_server_exits(server):
    stream = server.client().completions.create(
        model="tiny",
        prompt="Once upon a time",
        max_tokens=480,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    chunks = iter(stream)
    next(chunks)  # streaming: now kill the detokenizer mid-stream
    pid = detokenizer_pid(server.proc.pid)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(openai.APIError, match=rf"detokenizer process \(pid {pid}\) exited"):
        for _ in chunks:
            pass
    assert server.proc.wait(300) == 3, server.log()
    assert "stopping the server" in server.log()


@pytest.mark.slow
def test_sigterm_drains_with_the_process_and_leaves_no_process_behind(tiny_llama_dir, tmp_path):
    server = ServerProcess(
        tiny_llama_dir, tmp_path, "--served-model-name", "tiny", "--drain-timeout", "300",
        "--skip-warmup", "--detokenizer", "process",
    ).wait_ready()  # fmt: skip
    pid = detokenizer_pid(server.proc.pid)
    reasons, seen = sigterm_under_load(server, num=4, max_tokens=200)
    assert seen == {"health": 503, "new request": 503}
    assert reasons == ["length"] * 4  # the detokenizer kept serving through the drain
    assert gone(pid)
