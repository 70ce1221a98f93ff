"""PD disaggregation with two engines in one process (a prefill engine and a decode engine
stepped in turn), over the real transfer libraries on TCP loopback: greedy outputs equal a
colocated engine's, pages are freed on both sides, failures are clear errors."""

from __future__ import annotations

import os
import random
import socket
import time

import pytest
import torch
from fixtures.transfer import TRANSFER_BACKENDS
from pegboard.core.config import EngineConfig
from pegboard.core.engine import Engine
from pegboard.sdk.transfer import Bootstrap
from pegboard.sdk.types import FinishReason, Request, SamplingParams

BACKENDS = TRANSFER_BACKENDS
GREEDY = dict(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(autouse=True)
def _ucx_env(monkeypatch):
    monkeypatch.setenv("UCX_TLS", "tcp")
    monkeypatch.setenv("UCX_MODULES", "^ib")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_engine(model_dir, **settings) -> Engine:
    base = dict(
        model=str(model_dir),
        dtype="float32",
        device="cpu",
        page_size=4,
        kv_cache_tokens=512,
        max_num_batched_tokens=16,  # prompts longer than this are prefilled in chunks
        disaggregation_heartbeat_interval=0.2,
    )
    return Engine(EngineConfig(**{**base, **settings}))


def prompts(n: int = 5, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(8, 200) for _ in range(12)]
    out = [shared + [rng.randrange(8, 200) for _ in range(rng.randint(2, 30))] for _ in range(n)]
    out.append([rng.randrange(8, 200) for _ in range(3)])  # shorter than a page
    return out


def run(engines: list[Engine], requests: list[tuple[Engine, Request]], timeout: float = 120):
    """Step every engine until the requests finished; their outputs by request id."""
    for engine, r in requests:
        engine.add_request(r)
    ids = {r.request_id for _, r in requests}
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    finished: dict[str, object] = {}
    deadline = time.monotonic() + timeout
    while len(finished) < len(ids):
        assert time.monotonic() < deadline, f"unfinished: {ids - set(finished)}"
        busy = False
        for e in engines:
            if e.has_work():
                busy = True
                for out in e.step():
                    if out.request_id in ids:
                        tokens[out.request_id] += out.new_token_ids
                        if out.finished:
                            finished[out.request_id] = out
        if not busy:
            time.sleep(0.002)  # waiting on another thread (connect, transfer, heartbeat)
    return tokens, finished


def colocated(model_dir, batch) -> list[list[int]]:
    engine = make_engine(model_dir)
    try:
        reqs = [
            (engine, Request(p, SamplingParams(**GREEDY), request_id=f"c{i}"))
            for i, p in enumerate(batch)
        ]
        tokens, _ = run([engine], reqs)
        return [tokens[f"c{i}"] for i in range(len(batch))]
    finally:
        engine.close()


def pd_pair(model_dir, backend: str, prefill_cache: str = "radix"):
    port = free_port()
    prefill = make_engine(
        model_dir,
        kv_cache=prefill_cache,
        transfer=backend,
        disaggregation_mode="prefill",
        disaggregation_bootstrap_port=port,
    )
    decode = make_engine(model_dir, transfer=backend, disaggregation_mode="decode")
    return prefill, decode, port


def paired(batch, port: int, first_room: int = 0, params=None):
    """The two halves of each prompt's request, with the same bootstrap room."""
    pairs = []
    for i, p in enumerate(batch):
        boot = Bootstrap("127.0.0.1", port, first_room + i)
        rp = Request(p, SamplingParams(**(params or GREEDY)), request_id=f"p{first_room + i}")
        rd = Request(p, SamplingParams(**(params or GREEDY)), request_id=f"d{first_room + i}")
        rp.plugin_state["bootstrap"] = rd.plugin_state["bootstrap"] = boot
        pairs.append((rp, rd))
    return pairs


@pytest.mark.parametrize("backend", BACKENDS)
def test_pd_greedy_outputs_equal_colocated_and_pages_are_freed(tiny_llama_dir, backend):
    batch = prompts()
    expected = colocated(tiny_llama_dir, batch)
    prefill, decode, port = pd_pair(tiny_llama_dir, backend)
    try:
        engines = [prefill, decode]
        # Two waves: the second hits the radix cache of the prefill engine (shared prefix).
        for wave in range(2):
            pairs = paired(batch, port, first_room=wave * 100)
            work = [(prefill, rp) for rp, _ in pairs] + [(decode, rd) for _, rd in pairs]
            tokens, finished = run(engines, work)
            got = [tokens[rd.request_id] for _, rd in pairs]
            assert got == expected
            assert all(
                finished[rd.request_id].finish_reason is FinishReason.LENGTH for _, rd in pairs
            )
            assert all(len(tokens[rp.request_id]) == 1 for rp, _ in pairs)  # prefill only
        assert prefill.kv.stats().get("prefix_hit_tokens", 0) > 0
        for _ in range(3):  # the senders' last step frees the prefill pages
            prefill.step()
        assert decode.kv.num_free_pages == decode.kv.num_pages
        assert prefill.kv.num_free_pages == prefill.kv.num_pages
        assert not prefill.pd.senders and not decode.pd.receivers
    finally:
        prefill.close()
        decode.close()


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_decode_without_a_reachable_prefill_fails_with_a_clear_error(tiny_llama_dir, backend):
    decode = make_engine(tiny_llama_dir, transfer=backend, disaggregation_mode="decode")
    port = free_port()  # nobody listens there
    try:
        ((_, rd),) = paired([[5, 6, 7, 8, 9]], port)
        _, finished = run([decode], [(decode, rd)])
        out = finished[rd.request_id]
        assert out.finish_reason is FinishReason.ERROR
        assert (
            f"cannot reach the prefill engine's bootstrap server at 127.0.0.1:{port}" in out.error
        )
        assert decode.kv.num_free_pages == decode.kv.num_pages
    finally:
        decode.close()


@pytest.mark.parametrize("backend", BACKENDS[:1])
def test_a_prefill_engine_that_goes_away_fails_waiting_requests_and_frees_pages(
    tiny_llama_dir, backend
):
    prefill, decode, port = pd_pair(tiny_llama_dir, backend)
    try:
        pairs = paired(prompts(3), port)
        for _, rd in pairs:  # the decode halves register; the prefill halves never run
            decode.add_request(rd)
        deadline = time.monotonic() + 60
        while len(prefill.pd.early) < len(pairs):
            assert time.monotonic() < deadline
            decode.step()
            prefill.step()
            time.sleep(0.002)
        assert decode.kv.num_free_pages < decode.kv.num_pages  # pages wait for the KV
        prefill.pd.close()  # the prefill engine's connections drop, as when it is killed
        deadline = time.monotonic() + 60
        while decode.pd.receivers:
            assert time.monotonic() < deadline
            decode.step()
            time.sleep(0.002)
        assert all(rd.finish_reason is FinishReason.ERROR for _, rd in pairs)
        assert "lost the prefill engine at 127.0.0.1" in pairs[0][1].error
        assert decode.kv.num_free_pages == decode.kv.num_pages
    finally:
        prefill.close()
        decode.close()


def test_transfer_without_a_disaggregation_mode_is_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="--transfer mooncake needs --disaggregation-mode"):
        make_engine(tiny_llama_dir, transfer="mooncake")


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs"
)
@pytest.mark.parametrize("backend", BACKENDS)
def test_pd_across_two_gpus_equals_colocated(tiny_llama_dir, backend):
    """Prefill on cuda:0, decode on cuda:1: device memory moves through the plugin."""
    os.environ.pop("UCX_TLS", None)  # the plugin's GPU transports (cuda_ipc), not tcp alone
    batch = prompts()
    colo = make_engine(tiny_llama_dir, device="cuda:0")
    try:
        reqs = [
            (colo, Request(p, SamplingParams(**GREEDY), request_id=f"c{i}"))
            for i, p in enumerate(batch)
        ]
        tokens, _ = run([colo], reqs)
        expected = [tokens[f"c{i}"] for i in range(len(batch))]
    finally:
        colo.close()
    port = free_port()
    prefill = make_engine(
        tiny_llama_dir, device="cuda:0", transfer=backend, disaggregation_mode="prefill",
        disaggregation_bootstrap_port=port,
    )  # fmt: skip
    decode = make_engine(
        tiny_llama_dir, device="cuda:1", transfer=backend, disaggregation_mode="decode"
    )
    try:
        pairs = paired(batch, port)
        work = [(prefill, rp) for rp, _ in pairs] + [(decode, rd) for _, rd in pairs]
        tokens, _ = run([prefill, decode], work)
        assert [tokens[rd.request_id] for _, rd in pairs] == expected
        assert decode.kv.num_free_pages == decode.kv.num_pages
    finally:
        prefill.close()
        decode.close()
