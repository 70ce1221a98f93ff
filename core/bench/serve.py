"""`pegboard bench serve`: an async load generator against a running OpenAI-compatible server.

Each request streams `/v1/completions` (token-id prompts, or text prompts from a file) with
`ignore_eos` and its own `max_tokens`, so every request generates exactly what it asks for.
Requests arrive all at once, or as a seeded Poisson process (`--request-rate`), optionally
capped in flight (`--concurrency`). Per request it measures, from the moment it is sent:

- TTFT: until the first streamed chunk carrying generated text;
- ITL: every gap between consecutive generated chunks;
- TPOT: (e2e − TTFT) / (output tokens − 1), output tokens from the usage chunk;
- e2e: until `[DONE]`.

The run is bounded in count (`num_prompts`) and time (`time_limit`: requests still running
then are cancelled and counted as failed), and only loopback servers are accepted: this is a
benchmark for an engine on this machine, not a tool to load someone else's server.

    pegboard serve --model DIR --port 8000 &
    pegboard bench serve --url http://127.0.0.1:8000 --num-prompts 200 --request-rate 8

or from Python: `asyncio.run(run_serve_bench("http://127.0.0.1:8000", ServeWorkload()))`.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: The percentiles every latency summary reports.
PERCENTILES = (50, 90, 99)
#: Upper bound on `num_prompts`: a benchmark, not a flood.
MAX_PROMPTS = 100_000


@dataclass
class ServeWorkload:
    """What to send: `num_prompts` prompts (random token ids, or lines of `prompts_file`)
    with output lengths uniform in [min_output, max_output], drawn with `seed`."""

    num_prompts: int = 64
    min_input: int = 100
    max_input: int = 1024
    min_output: int = 100
    max_output: int = 1024
    max_token_id: int = 10000
    prompts_file: str | None = None
    temperature: float = 0.0
    seed: int = 0

    def build(self) -> list[tuple[list[int] | str, int]]:
        """(prompt, max_tokens) pairs. Random ids are drawn in `bench offline`'s order, so the
        same seed and ranges send the same prompts and lengths as the offline workload.

        A prompts file holds one prompt per line: plain text, or a JSON object with `prompt`
        (text or token ids) and optionally `max_tokens`; lines are reused in turn if the file
        has fewer than `num_prompts`."""
        if not 0 < self.num_prompts <= MAX_PROMPTS:
            raise ValueError(f"num_prompts must be in 1..{MAX_PROMPTS}, not {self.num_prompts}")
        rng = random.Random(self.seed)
        if self.prompts_file is None:
            prompts: list = [
                [
                    rng.randint(0, self.max_token_id)
                    for _ in range(rng.randint(self.min_input, self.max_input))
                ]
                for _ in range(self.num_prompts)
            ]
            given: list[int | None] = [None] * self.num_prompts
        else:
            lines = _read_prompts(Path(self.prompts_file))
            picked = [lines[i % len(lines)] for i in range(self.num_prompts)]
            prompts = [p for p, _ in picked]
            given = [n for _, n in picked]
        return [
            (p, n if n is not None else rng.randint(self.min_output, self.max_output))
            for p, n in zip(prompts, given)
        ]


def _read_prompts(path: Path) -> list[tuple[list[int] | str, int | None]]:
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                out.append((obj["prompt"], obj.get("max_tokens")))
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{path}:{number}: expected {{'prompt': ...}}: {e}") from None
        else:
            out.append((line, None))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


@dataclass
class RequestRecord:
    """What one request did; times in seconds from the moment it was sent."""

    prompt_tokens: int = 0
    max_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    e2e: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.e2e is not None

    @property
    def tpot(self) -> float | None:
        if not self.ok or self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    def summary(self) -> dict:
        """The record as JSON, without the inter-chunk gaps."""
        return {
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "output_tokens": self.output_tokens,
            "ttft_s": _round(self.ttft),
            "tpot_s": _round(self.tpot),
            "e2e_s": _round(self.e2e),
            "chunks": len(self.itl) + (self.ttft is not None),
            "error": self.error,
        }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 6)


def check_loopback(url: str) -> str:
    """`url` without a trailing slash; ValueError unless it is http(s) on a loopback host."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or parts.hostname not in LOOPBACK_HOSTS:
        raise ValueError(
            f"{url!r}: bench serve only loads a server on this machine "
            f"(http://127.0.0.1:PORT, localhost or [::1])"
        )
    return url.rstrip("/")


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between order statistics."""
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(values: list[float]) -> dict[str, float | None]:
    """Mean and percentiles of `values` (seconds) in milliseconds; None for no values."""
    if not values:
        return {"mean": None, **{f"p{q}": None for q in PERCENTILES}}
    ms = [v * 1000 for v in values]
    return {
        "mean": round(sum(ms) / len(ms), 3),
        **{f"p{q}": round(percentile(ms, q), 3) for q in PERCENTILES},
    }


def arrival_offsets(n: int, request_rate: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of `n` requests: all 0 for an infinite rate, else a
    Poisson process of `request_rate` per second (exponential gaps from `seed`)."""
    if math.isinf(request_rate):
        return [0.0] * n
    if request_rate <= 0:
        raise ValueError(f"request rate must be positive, not {request_rate}")
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(request_rate)
    return out


async def wait_ready(
    client: httpx.AsyncClient,
    base: str,
    timeout: float,
    gone: Callable[[], str | None] | None = None,
) -> None:
    """Poll `/health` until it answers 200 (a server still loading its model answers 503);
    TimeoutError after `timeout` seconds. `gone()`, if given, says why the server can no
    longer come up (it exited): then ChildProcessError at once instead of waiting."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await client.get(base + "/health")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if gone is not None and (reason := gone()):
            raise ChildProcessError(reason)
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{base}/health did not answer 200 within {timeout} s")
        await asyncio.sleep(0.5)


async def discover_model(client: httpx.AsyncClient, base: str) -> str:
    """The first model the server lists on `/v1/models`."""
    r = await client.get(base + "/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def send_request(
    client: httpx.AsyncClient,
    base: str,
    model: str,
    prompt: list[int] | str,
    max_tokens: int,
    temperature: float,
) -> RequestRecord:
    """Stream one completion and time its chunks."""
    record = RequestRecord(
        prompt_tokens=len(prompt) if isinstance(prompt, list) else 0, max_tokens=max_tokens
    )
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    done = False
    try:
        async with client.stream("POST", base + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    record.error = f"stream error: {chunk['error'].get('message')}"
                    return record
                now = time.perf_counter()
                if chunk.get("choices"):
                    if record.ttft is None:
                        record.ttft = now - start
                    else:
                        record.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    record.output_tokens = chunk["usage"]["completion_tokens"]
                    record.prompt_tokens = chunk["usage"]["prompt_tokens"]
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
        return record
    if not done:
        record.error = "stream ended without [DONE]"
    elif record.ttft is None:
        record.error = "no generated chunk"
    else:
        record.e2e = time.perf_counter() - start
    return record


async def run_serve_bench(
    url: str,
    workload: ServeWorkload,
    *,
    model: str | None = None,
    concurrency: int | None = None,
    request_rate: float = math.inf,
    time_limit: float = 600.0,
    request_timeout: float = 300.0,
    ready_timeout: float = 0.0,
    progress: bool = False,
    server_gone: Callable[[], str | None] | None = None,
) -> dict:
    """Send the workload to the server at `url` (loopback only) and return the figures; the
    per-request records are under `per_request`. With `ready_timeout`, first wait that long
    for the server to be ready (`server_gone`: see `wait_ready`)."""
    base = check_loopback(url)
    requests = workload.build()
    offsets = arrival_offsets(len(requests), request_rate, workload.seed)
    if concurrency is not None and concurrency < 1:
        raise ValueError(f"concurrency must be at least 1, not {concurrency}")
    limit = asyncio.Semaphore(concurrency or len(requests))
    connections = httpx.Limits(max_connections=concurrency or len(requests))
    timeout = httpx.Timeout(request_timeout, connect=10.0)
    records: list[RequestRecord | None] = [None] * len(requests)

    async with httpx.AsyncClient(timeout=timeout, limits=connections) as client:
        if ready_timeout > 0:
            await wait_ready(client, base, ready_timeout, server_gone)
        model = model or await discover_model(client, base)
        bar = _progress_bar(len(requests), progress)
        start = time.perf_counter()

        async def one(i: int) -> None:
            await asyncio.sleep(max(0.0, start + offsets[i] - time.perf_counter()))
            async with limit:
                prompt, max_tokens = requests[i]
                records[i] = await send_request(
                    client, base, model, prompt, max_tokens, workload.temperature
                )
            bar.update(1)

        tasks = [asyncio.create_task(one(i)) for i in range(len(requests))]
        _, pending = await asyncio.wait(tasks, timeout=time_limit)
        for task in pending:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        elapsed = time.perf_counter() - start
    bar.close()
    for i, (prompt, max_tokens) in enumerate(requests):
        if records[i] is None:
            records[i] = RequestRecord(
                prompt_tokens=len(prompt) if isinstance(prompt, list) else 0,
                max_tokens=max_tokens,
                error=f"not finished within the time limit ({time_limit} s)",
            )
    return {
        "kind": "serve",
        "url": base,
        "model": model,
        "workload": asdict(workload),
        "concurrency": concurrency,
        "request_rate": None if math.isinf(request_rate) else request_rate,
        "time_limit_s": time_limit,
    } | summarize(records, elapsed)


def summarize(records: list[RequestRecord], elapsed: float) -> dict:
    """Throughput and latency figures over the successful requests."""
    ok = [r for r in records if r.ok]
    errors = [r.error for r in records if not r.ok]
    input_tokens = sum(r.prompt_tokens for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    return {
        "requests": len(records),
        "completed": len(ok),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],
        "elapsed_s": round(elapsed, 3),
        "input_tokens": input_tokens,
        "output_tokens": output_tokens,
        "requests_per_s": round(len(ok) / elapsed, 3),
        "output_tok_s": round(output_tokens / elapsed, 1),
        "total_tok_s": round((input_tokens + output_tokens) / elapsed, 1),
        "ttft_ms": latency_summary([r.ttft for r in ok]),
        "tpot_ms": latency_summary([r.tpot for r in ok if r.tpot is not None]),
        "itl_ms": latency_summary([gap for r in ok for gap in r.itl]),
        "e2e_ms": latency_summary([r.e2e for r in ok]),
        "per_request": [r.summary() for r in records],
    }


def _progress_bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc="bench serve", unit="req")
