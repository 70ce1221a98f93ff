"""`pegboard serve --stream-interval N`: a streamed choice sends its first token at once, then
one event per N tokens, then its last; the text and tokens are those of an unstreamed reply."""

from __future__ import annotations

import argparse

import pytest
from pegboard.core.cli.main import build_parser
from test_server_process import ServerProcess

INTERVAL = 4
MAX_TOKENS = 14


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(["serve", *argv])
    return args.resolve(args)


def test_the_flag_counts_tokens_from_one(capsys):
    assert parse().stream_interval == 1
    assert parse("--stream-interval", "8").stream_interval == 8
    for bad in ("0", "-2", "two"):
        with pytest.raises(SystemExit):
            parse("--stream-interval", bad)
        assert "--stream-interval" in capsys.readouterr().err


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory):
    proc = ServerProcess(
        tiny_llama_dir, tmp_path_factory.mktemp("serve"), "--stream-interval", str(INTERVAL)
    )
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()


def test_first_token_at_once_then_one_event_per_interval(server):
    client = server.client()
    kw = dict(model=None, prompt="Once upon a time", max_tokens=MAX_TOKENS, temperature=0)
    kw |= dict(logprobs=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True)]
    tokens = [len(c.logprobs.tokens) for c in chunks]
    # Events after the first wait for the interval (or hold more, if the reader fell behind).
    # How many tokens the first holds depends on how soon the reader ran (on a busy machine
    # the engine may be several steps ahead): `test_the_first_delta_wakes_the_reader_at_once`
    # checks the rule itself.
    assert sum(tokens) == MAX_TOKENS, tokens
    assert all(n >= INTERVAL for n in tokens[1:-1]), tokens
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["length"]
    assert "".join(c.text for c in chunks) == whole.text
    assert [t for c in chunks for t in c.logprobs.tokens] == whole.logprobs.tokens


def test_chat_streams_the_same_content_in_fewer_events(server):
    client = server.client()
    kw = dict(model=None, messages=[{"role": "user", "content": "Tell me about the river."}])
    kw |= dict(max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks[1:]]
    assert "".join(contents) == whole
    assert 2 <= len(contents) <= 2 + MAX_TOKENS // INTERVAL, contents


def test_the_first_delta_wakes_the_reader_at_once_then_every_interval_and_the_last():
    import asyncio

    from pegboard.core.async_engine import _Stream
    from pegboard.core.outputs import RequestOutput

    def delta(n: int, finished: bool = False) -> RequestOutput:
        return RequestOutput("r", new_token_ids=[7] * n, finished=finished)

    async def run() -> list[int]:
        stream = _Stream(asyncio.get_running_loop(), INTERVAL)
        read = []
        stream.push(delta(1))
        assert stream.ready()  # the first delta: at once
        read.append(len((await stream.next()).new_token_ids))
        for _ in range(INTERVAL - 1):
            stream.push(delta(1))
            assert not stream.ready()  # fewer than the interval since the last read
        stream.push(delta(1))
        assert stream.ready()
        read.append(len((await stream.next()).new_token_ids))
        stream.push(delta(1, finished=True))
        assert stream.ready()  # the last delta: at once, however few tokens it has
        read.append(len((await stream.next()).new_token_ids))
        return read

    assert asyncio.run(run()) == [1, INTERVAL, 1]
