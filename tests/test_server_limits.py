"""What a request may cost: an oversized body is a 413 before it is read, a prompt longer than
any the context holds is a 400 before it is tokenized, text that is not valid Unicode is a 400,
`max_tokens` beyond the context is a 400, and types are strict — and none of it costs the
server memory or a traceback."""

from __future__ import annotations

from json import dumps
from pathlib import Path

import httpx
import openai
import pytest
from test_server_process import ServerProcess

MAX_REQUEST_BYTES = 8 << 20
MAX_MODEL_LEN = 512  # the tiny fixtures' context
# What a rejected request may add to the server's resident memory (allocator noise; reading,
# tokenizing or validating these prompts costs hundreds of MiB).
RSS_SLACK = 48 << 20


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    proc = ServerProcess(
        tiny_llama_dir,
        tmp_path_factory.mktemp("serve"),
        "--served-model-name", "tiny",
        "--max-request-bytes", str(MAX_REQUEST_BYTES),
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()
    assert "Traceback" not in proc.log()


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def post(server: ServerProcess, path: str, json: dict | None = None, **kw) -> httpx.Response:
    if json is not None:  # escaped as `\\uXXXX`, so that lone surrogates can be sent
        kw["content"] = dumps(json)
        kw["headers"] = {"content-type": "application/json"}
    return httpx.post(server.url + path, timeout=600, **kw)


def test_a_50_mb_body_is_413_unread(server):
    body = b'{"prompt": "' + b"a" * (50 << 20) + b'"}'
    before = rss(server.proc.pid)
    try:
        r = post(
            server, "/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        status, message = r.status_code, r.json()["error"]["message"]
    except httpx.TransportError:  # the server answered and closed before the upload ended
        pytest.fail("the 413 did not reach the client")
    assert status == 413 and "--max-request-bytes" in message
    assert rss(server.proc.pid) - before < RSS_SLACK


def test_a_chunked_body_over_the_cap_is_413(server):
    def chunks():
        for _ in range(MAX_REQUEST_BYTES // (1 << 20) + 2):
            yield b" " * (1 << 20)

    r = post(server, "/v1/completions", content=chunks())
    assert r.status_code == 413


def test_text_longer_than_any_prompt_the_context_holds_is_400_untokenized(server):
    before = rss(server.proc.pid)
    r = post(server, "/v1/completions", json={"prompt": "hello " * (1 << 20), "max_tokens": 1})
    assert r.status_code == 400
    assert "more than any prompt that fits the context" in r.json()["error"]["message"]
    assert rss(server.proc.pid) - before < RSS_SLACK
    r = post(server, "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi " * (1 << 20)}]})  # fmt: skip
    assert r.status_code == 400


def test_token_ids_beyond_the_context_are_400_unvalidated(server):
    before = rss(server.proc.pid)
    r = post(server, "/v1/completions", json={"prompt": [1] * (1 << 20), "max_tokens": 1})
    assert r.status_code == 400
    assert f"the context holds {MAX_MODEL_LEN} tokens" in r.json()["error"]["message"]
    assert rss(server.proc.pid) - before < RSS_SLACK
    r = post(server, "/v1/completions", json={"prompt": [[1, 2], [1] * 600]})
    assert r.status_code == 400


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/completions", {"prompt": "\ud800"}),
        ("/v1/completions", {"prompt": "ok", "stop": ["\udfff"]}),
        ("/v1/completions", {"prompt": "ok", "model": "\ud800"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}),
    ],
)
def test_a_lone_surrogate_is_400(server, path, body):
    r = post(server, path, json=body)
    assert r.status_code == 400, r.text
    assert "not valid Unicode" in r.json()["error"]["message"]


def test_a_surrogate_pair_is_one_character_and_served(server):
    r = post(server, "/v1/completions", json={"prompt": "smile \ud83d\ude00", "max_tokens": 2})
    assert r.status_code == 200, r.text


def test_max_tokens_beyond_the_context_is_400_like_vllm(server):
    client = server.client()
    with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
        client.completions.create(model="tiny", prompt="hello", max_tokens=MAX_MODEL_LEN)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_MODEL_LEN
        )
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=4)
    assert out.usage.completion_tokens <= 4


@pytest.mark.parametrize(
    "body",
    [{"stream": "yes"}, {"n": "2"}, {"max_tokens": "4"}, {"echo": 1}, {"temperature": "0"}],
)
def test_types_are_strict(server, body):
    r = post(server, "/v1/completions", json={"prompt": "hello", **body})
    assert r.status_code == 422, r.text


def test_logprobs_false_and_top_logprobs_0_are_accepted(server):
    client = server.client()
    out = client.completions.create(model="tiny", prompt="hello", max_tokens=2, logprobs=False)
    assert out.choices[0].logprobs is None
    chat = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=2,
        logprobs=False,
        top_logprobs=0,
    )
    assert chat.choices[0].logprobs is None
