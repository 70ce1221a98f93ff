"""The OpenAI-compatible API of a real `pegboard serve` process, driven by the official client:
outputs equal the offline engine's, streaming, n, seeds, logprobs, stop, errors, auth,
metrics, client disconnects and the admin API."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams
from prometheus_client.parser import text_string_to_metric_families
from test_server_process import ADMIN_TOKEN, API_KEY, ServerProcess

MODEL = "tiny"
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "Plugins extend the engine:",
    "def add(a, b):",
]
CHATS = ["Hello world! How are you today?", "Tell me about the river."]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def metrics_log(tmp_path_factory):
    return tmp_path_factory.mktemp("metrics") / "metrics.jsonl"


@pytest.fixture(scope="module")
def server(tiny_llama_dir, tmp_path_factory, metrics_log):
    proc = ServerProcess(
        tiny_llama_dir,
        tmp_path_factory.mktemp("serve"),
        "--served-model-name", MODEL,
        "--admin-token", ADMIN_TOKEN,
        "--api-key", API_KEY,
        "--metrics", "jsonl",
        "--jsonl-path", str(metrics_log),
        "--jsonl-flush-interval-s", "0",
    )  # fmt: skip
    try:
        yield proc.wait_ready()
    finally:
        assert proc.stop() == 0, proc.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def reference(tiny_llama_dir) -> dict[str, str]:
    """Greedy texts of the offline engine, for completions and chats."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
    try:
        texts = {p: o.text for p, o in zip(PROMPTS, llm.generate(PROMPTS, params))}
        chats = llm.chat([[{"role": "user", "content": c}] for c in CHATS], params)
        texts.update({f"chat:{c}": o.text for c, o in zip(CHATS, chats)})
    finally:
        llm.close()
    return texts


def metric_samples(server: ServerProcess) -> dict[str, float]:
    """Every sample of /metrics, keyed `name{label=value,...}`."""
    text = httpx.get(server.url + "/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            assert s.labels.pop("model_name") == MODEL, s  # every series names the model
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def wait_idle(server: ServerProcess, timeout: float = 30.0) -> dict[str, float]:
    """/metrics once no request runs or waits and the KV cache is empty."""
    deadline = time.monotonic() + timeout
    while True:
        s = metric_samples(server)
        idle = s["pegboard:num_requests_running"] == 0 and s["pegboard:num_requests_waiting"] == 0
        if idle and s["pegboard:kv_cache_usage_perc"] == 0:
            return s
        if time.monotonic() > deadline:
            raise TimeoutError(f"engine not idle: {s}")
        time.sleep(0.05)


# ---------------------------------------------------------------- outputs


def test_completions_equal_the_offline_engine(client, reference):
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS, max_tokens=MAX_TOKENS, temperature=0
    )
    assert [c.index for c in out.choices] == list(range(len(PROMPTS)))
    assert [c.text for c in out.choices] == [reference[p] for p in PROMPTS]
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_streamed_completions_equal_the_offline_engine(client, reference):
    for prompt in PROMPTS:
        stream = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=MAX_TOKENS,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == reference[prompt]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("stop", "length")
        assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens > 0


def test_chat_equals_the_offline_engine_streamed_and_not(client, reference):
    for content in CHATS:
        messages = [{"role": "user", "content": content}]
        full = client.chat.completions.create(
            model=MODEL, messages=messages, max_completion_tokens=MAX_TOKENS, temperature=0
        )
        assert full.choices[0].message.role == "assistant"
        assert full.choices[0].message.content == reference[f"chat:{content}"]
        stream = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0, stream=True
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text == reference[f"chat:{content}"]
        assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_token_id_prompts_give_the_same_text(client, reference, tiny_llama_dir):
    from pegboard.core.tokenizer import load_tokenizer

    ids = load_tokenizer(tiny_llama_dir).encode(PROMPTS[0])
    out = client.completions.create(model=MODEL, prompt=ids, max_tokens=MAX_TOKENS, temperature=0)
    assert out.choices[0].text == reference[PROMPTS[0]]
    assert out.usage.prompt_tokens == len(ids)


def test_n_with_a_seed_is_reproducible_and_fans_out(client):
    def sample():
        return client.completions.create(
            model=MODEL, prompt=PROMPTS[1], max_tokens=12, temperature=1.0, n=4, seed=7
        )

    a, b = sample(), sample()
    assert [c.index for c in a.choices] == [0, 1, 2, 3]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # seed + i: the samples differ


def test_stop_string_cuts_the_output(client, reference):
    full = reference[PROMPTS[2]]
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[2], max_tokens=MAX_TOKENS, temperature=0, stop=[stop]
    )
    assert out.choices[0].text == full[: full.index(stop)]
    assert out.choices[0].finish_reason == "stop"


def test_completion_logprobs_have_the_legacy_shape(client):
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=3
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert 1 <= len(top) <= 3
        # Greedy: the chosen token is the most likely one.
        assert chosen == pytest.approx(max(top.values()))
    assert lp.text_offset == sorted(lp.text_offset)


def test_chat_logprobs_have_the_chat_shape(client):
    out = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": CHATS[0]}],
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert bytes(entry.bytes).decode(errors="replace") == entry.token


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == [MODEL]


# ---------------------------------------------------------------- errors and auth


def post(
    server: ServerProcess, path: str, body, key: str | None = API_KEY, timeout: float = 60
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, (dict, list)):
        return httpx.post(server.url + path, json=body, headers=headers, timeout=timeout)
    headers["Content-Type"] = "application/json"
    return httpx.post(server.url + path, content=body, headers=headers, timeout=timeout)


BAD_REQUESTS = [
    ("malformed json", "/v1/completions", '{"prompt": "a", ', 400),
    ("prompt over the context", "/v1/completions", {"prompt": [10] * 600}, 400),
    ("token id out of vocabulary", "/v1/completions", {"prompt": [10, 10**6]}, 400),
    ("unknown model", "/v1/completions", {"model": "gpt-9", "prompt": "a"}, 404),
    ("wrong type", "/v1/completions", {"prompt": "a", "max_tokens": "many"}, 422),
    ("temperature out of range", "/v1/completions", {"prompt": "a", "temperature": 5}, 422),
    ("n of zero", "/v1/completions", {"prompt": "a", "n": 0}, 422),
    ("top_p of zero", "/v1/completions", {"prompt": "a", "top_p": 0}, 422),
    ("logit_bias", "/v1/completions", {"prompt": "a", "logit_bias": {"5": 1.0}}, 422),
    ("missing prompt", "/v1/completions", {"max_tokens": 3}, 422),
    ("empty messages", "/v1/chat/completions", {"messages": []}, 422),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422),
    (
        "chat over the context",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "river " * 600}]},
        400,
    ),
    ("array body", "/v1/chat/completions", [1, 2], 422),
]


@pytest.mark.parametrize(
    "path,body,status", [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_input_gets_its_status_and_an_openai_error(server, client, path, body, status):
    r = post(server, path, body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == status and error["message"] and error["type"]
    # The server keeps serving.
    assert (
        client.completions.create(model=MODEL, prompt="a", max_tokens=2).choices[0].text is not None
    )


def test_the_client_raises_openai_errors(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-9", prompt="a")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt=[7] * 600)
    with pytest.raises(openai.UnprocessableEntityError):
        client.completions.create(model=MODEL, prompt="a", temperature=-1)


def test_v1_needs_the_api_key(server):
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()
    assert post(server, "/v1/completions", {"prompt": "a"}, key=None).status_code == 401
    assert httpx.get(server.url + "/health").status_code == 200  # health and metrics stay open
    assert httpx.get(server.url + "/metrics").status_code == 200


# ---------------------------------------------------------------- metrics


def test_metrics_parse_and_counters_move_as_requests_complete(server, client):
    before = wait_idle(server)
    outs = [
        client.completions.create(
            model=MODEL, prompt=p, max_tokens=5, temperature=0, extra_body={"ignore_eos": True}
        )
        for p in PROMPTS[:3]
    ]
    after = wait_idle(server)
    key = "pegboard:request_success_total{finished_reason=length}"
    assert after[key] - before.get(key, 0) == 3
    generated = sum(o.usage.completion_tokens for o in outs)
    assert generated == 15
    assert (
        after["pegboard:generation_tokens_total"] - before["pegboard:generation_tokens_total"] == 15
    )
    prompt_tokens = sum(o.usage.prompt_tokens for o in outs)
    assert (
        after["pegboard:prompt_tokens_total"] - before["pegboard:prompt_tokens_total"]
        == prompt_tokens
    )
    for name in (
        "time_to_first_token_seconds",
        "e2e_request_latency_seconds",
        "request_queue_time_seconds",
    ):
        assert after[f"pegboard:{name}_count"] - before[f"pegboard:{name}_count"] == 3
    assert after["pegboard:engine_steps_total"] > before["pegboard:engine_steps_total"]


def test_jsonl_exporter_receives_the_snapshots_prometheus_receives(server, client, metrics_log):
    client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=3)
    samples = wait_idle(server)
    lines = [json.loads(line) for line in metrics_log.read_text().splitlines()]
    steps = sum(1 for line in lines if line["kind"] == "step")
    finished = sum(1 for line in lines if line["kind"] == "request")
    assert steps == samples["pegboard:engine_steps_total"]
    requests_total = sum(
        v for k, v in samples.items() if k.startswith("pegboard:request_success_total{")
    )
    assert finished == requests_total > 0


# ---------------------------------------------------------------- disconnects


def test_a_client_that_disconnects_mid_stream_has_its_kv_freed(server):
    before = wait_idle(server)
    body = {
        "model": MODEL,
        "prompt": PROMPTS[3],
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    headers = {"Authorization": f"Bearer {API_KEY}"}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, headers=headers) as r:
        lines = r.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert all(line.startswith("data: ") or line == "" for line in received)
        busy = metric_samples(server)
        assert busy["pegboard:num_requests_running"] == 1
        assert busy["pegboard:kv_cache_usage_perc"] > 0
    after = wait_idle(server, timeout=10)
    key = "pegboard:request_success_total{finished_reason=abort}"
    assert after[key] - before.get(key, 0) == 1
    assert (
        after["pegboard:generation_tokens_total"] - before["pegboard:generation_tokens_total"] < 400
    )


def test_a_non_streaming_client_that_disconnects_has_its_request_aborted(server):
    before = wait_idle(server)
    body = {"model": MODEL, "prompt": PROMPTS[3], "max_tokens": 480, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        post(server, "/v1/completions", body, timeout=0.3)
    after = wait_idle(server, timeout=10)
    key = "pegboard:request_success_total{finished_reason=abort}"
    assert after[key] - before.get(key, 0) == 1


# ---------------------------------------------------------------- admin


def test_admin_needs_the_admin_token(server):
    assert server.admin("GET", "/admin/plugins", token=None).status_code == 401
    assert server.admin("GET", "/admin/plugins", token="nope").status_code == 403
    assert server.admin("GET", "/admin/plugins", token=API_KEY).status_code == 403


def test_admin_lists_plugins(server):
    report = server.admin("GET", "/admin/plugins").json()
    assert report["active"]["scheduler"] == "fcfs"
    assert report["active"]["kv_cache"] == "paged"
    assert set(report["active"]["metrics"]) == {"prometheus", "jsonl"}
    names = {p["name"] for p in report["plugins"]}
    assert {"fcfs", "sjf", "paged", "torch", "standard", "prometheus", "jsonl"} <= names


def test_admin_swap_takes_effect_and_bad_swaps_say_why(server, client, reference):
    r = server.admin("POST", "/admin/plugins/scheduler", json={"name": "sjf"})
    assert r.status_code == 200, r.text
    assert r.json() == {"slot": "scheduler", "previous": "fcfs", "active": "sjf", "drained": False}
    assert server.admin("GET", "/admin/plugins").json()["active"]["scheduler"] == "sjf"
    out = client.completions.create(
        model=MODEL, prompt=PROMPTS[0], max_tokens=MAX_TOKENS, temperature=0
    )
    assert out.choices[0].text == reference[PROMPTS[0]]

    unknown = server.admin("POST", "/admin/plugins/scheduler", json={"name": "nope"})
    assert unknown.status_code == 404 and "nope" in unknown.json()["error"]["message"]
    bad_options = server.admin(
        "POST", "/admin/plugins/scheduler", json={"name": "fcfs", "options": {"no_such": 1}}
    )
    assert bad_options.status_code == 422 and "no_such" in bad_options.json()["error"]["message"]
    assert server.admin("POST", "/admin/plugins/warp", json={"name": "x"}).status_code == 404
    multi = server.admin("POST", "/admin/plugins/metrics", json={"name": "jsonl"})
    assert multi.status_code == 400

    back = server.admin("POST", "/admin/plugins/scheduler", json={"name": "fcfs"})
    assert back.json()["active"] == "fcfs"
