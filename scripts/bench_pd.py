"""PD disaggregation on two GPUs vs colocated on one and DP=2 on two (random weights).

Setups, each started, measured and stopped in turn:
- `colocated`: one `pegboard serve` on GPU 0.
- `pd`: prefill server on GPU 0, decode server on GPU 1 (`--transfer BACKEND`), and
  `pegboard router --pd` in front.
- `dp2`: `pegboard serve --dp-size 2` (one replica per GPU behind the built-in router).

Per setup: (1) greedy outputs of `--check-prompts` prompts (must equal colocated's); (2) the
mixed load: `--streams` decode streams (short prompt, `--stream-tokens` tokens each) start at
once; after `--long-delay` s, `--long-prompts` prompts of `--long-len` tokens arrive one per
`--long-gap` s. Reported: the decode streams' ITL p50/p99 (gaps between streamed chunks while
long prompts arrive) and TTFT, the long prompts' TTFT, and for `pd` the KV transfer bandwidth
per request (from the prefill server's log lines) and the transfer counters of both servers'
`/metrics` (`pegboard:kv_transfer_*`). Prints JSON (and writes it to `--json`).

    python scripts/bench_pd.py --config qwen3-0.6b --backend mooncake --json pd.json

On the lent two-GPU machine: `bash scripts/device-run.sh pd-mooncake` (or `pd-nixl`); what to
carry is in docs/benchmarks.md, "PD disaggregation".
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PY = [sys.executable, "-m", "pegboard.core.cli.main"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Proc:
    def __init__(
        self, name: str, cmd: list[str], gpus: str | None, logdir: str, url: str = ""
    ) -> None:
        self.url = url
        env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
        env.setdefault("UCX_MODULES", "^ib")
        if gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpus
        self.log_path = os.path.join(logdir, f"{name}.log")
        self.log_file = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log_file, stderr=subprocess.STDOUT)

    def log(self) -> str:
        with open(self.log_path) as f:
            return f.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()


def wait_healthy(url: str, procs: list[Proc], timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            if p.proc.poll() is not None:
                raise RuntimeError(f"{p.log_path} exited {p.proc.returncode}:\n{p.log()[-4000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise TimeoutError(url)


def serve_cmd(model_dir: str, port: int, extra: list[str]) -> list[str]:
    return [*PY, "serve", "--model", model_dir, "--load-format", "dummy", "--served-model-name",
            "m", "--port", str(port), *extra]  # fmt: skip


def start(
    setup: str,
    model_dir: str,
    backend: str,
    logdir: str,
    server_args: list[str],
    pd_args: list[str],
):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs: list[Proc] = []
    try:
        if setup == "colocated":
            procs.append(Proc("colocated", serve_cmd(model_dir, port, server_args), "0", logdir))
        elif setup == "dp2":
            dp2 = serve_cmd(model_dir, port, ["--dp-size", "2", *server_args])
            procs.append(Proc("dp2", dp2, "0,1", logdir))
        else:
            pp, dp, bport = free_port(), free_port(), free_port()
            pd = ["--transfer", backend]
            # Both servers see both GPUs (`--device` picks theirs): CUDA IPC between them
            # (Mooncake's nvlink_intra, UCX's cuda_ipc) needs the peer's device visible.
            prefill = Proc("prefill", serve_cmd(model_dir, pp, [*pd, "--disaggregation-mode",
                           "prefill", "--disaggregation-bootstrap-port", str(bport), "--device",
                           "cuda:0", *pd_args, *server_args]), None, logdir,
                           f"http://127.0.0.1:{pp}")  # fmt: skip
            procs.append(prefill)
            decode = Proc("decode", serve_cmd(model_dir, dp, [*pd, "--disaggregation-mode",
                          "decode", "--device", "cuda:1", *pd_args, *server_args]), None, logdir,
                          f"http://127.0.0.1:{dp}")  # fmt: skip
            procs.append(decode)
            wait_healthy(f"http://127.0.0.1:{pp}", [prefill])
            wait_healthy(f"http://127.0.0.1:{dp}", [decode])
            procs.append(Proc("router", [*PY, "router", "--pd", "--port", str(port), "--prefill",
                              f"http://127.0.0.1:{pp}", str(bport), "--decode",
                              f"http://127.0.0.1:{dp}"], None, logdir))  # fmt: skip
        wait_healthy(url, procs)
    except BaseException:
        stop_all(procs)  # a server left running would hold its GPU for the next setup
        raise
    return url, procs


def stop_all(procs: list[Proc]) -> None:
    for p in reversed(procs):
        p.stop()


async def stream_one(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int):
    """(ttft, gaps between chunks, text) of one streamed greedy completion."""
    body = {"model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}  # fmt: skip
    start = time.perf_counter()
    times, text = [], []
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"])
            times.append(time.perf_counter())
            text.append(chunk["choices"][0]["text"])
    ttft = times[0] - start if times else float("nan")
    return ttft, [b - a for a, b in zip(times, times[1:])], "".join(text)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


async def workload(url: str, args) -> dict:
    rng = random.Random(0)
    vocab = args.max_token_id
    limits = httpx.Limits(max_connections=None)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        checks = [[rng.randrange(100, vocab) for _ in range(rng.randint(16, args.check_len))]
                  for _ in range(args.check_prompts)]  # fmt: skip
        outputs = [(await stream_one(client, url, p, 32))[2] for p in checks]
        streams = [[rng.randrange(100, vocab) for _ in range(128)] for _ in range(args.streams)]
        longs = [[rng.randrange(100, vocab) for _ in range(args.long_len)]
                 for _ in range(args.long_prompts)]  # fmt: skip

        async def long_arrivals():
            await asyncio.sleep(args.long_delay)
            tasks = []
            for p in longs:
                tasks.append(asyncio.create_task(stream_one(client, url, p, 16)))
                await asyncio.sleep(args.long_gap)
            return await asyncio.gather(*tasks)

        decode = [stream_one(client, url, p, args.stream_tokens) for p in streams]
        started = time.perf_counter()
        *decoded, long_results = await asyncio.gather(*decode, long_arrivals())
        elapsed = time.perf_counter() - started
    gaps = [g for _, gs, _ in decoded for g in gs]
    return {
        "outputs": outputs,
        "decode_itl_p50_ms": pct(gaps, 50) * 1e3,
        "decode_itl_p99_ms": pct(gaps, 99) * 1e3,
        "decode_itl_max_ms": max(gaps) * 1e3 if gaps else float("nan"),
        "decode_ttft_p50_ms": statistics.median(t for t, _, _ in decoded) * 1e3,
        "long_ttft_p50_ms": statistics.median(t for t, _, _ in long_results) * 1e3,
        "long_ttft_max_ms": max(t for t, _, _ in long_results) * 1e3,
        "output_tok_s": sum(len(gs) + 1 for _, gs, _ in decoded) / elapsed,
    }


TRANSFER_LINE = re.compile(
    r"KV (\d+) bytes in (\d+) runs to \S+ in ([0-9.]+) ms \(([0-9.]+) GB/s\)"
)


def transfer_stats(log: str) -> dict:
    rows = [
        (int(b), int(n), float(ms), int(b) / max(float(ms), 1e-6) / 1e6)
        for b, n, ms, _ in TRANSFER_LINE.findall(log)
    ]  # GB/s from bytes and ms: the log rounds small transfers to 0.00 GB/s
    if not rows:
        return {"transfers": 0}
    return {
        "transfers": len(rows),
        "bytes_per_request_p50": statistics.median(r[0] for r in rows),
        "runs_per_request_p50": statistics.median(r[1] for r in rows),
        "ms_per_request_p50": statistics.median(r[2] for r in rows),
        "gb_s_per_request_p50": statistics.median(r[3] for r in rows),
        "gb_s_per_request_max": max(r[3] for r in rows),
        "largest_request_bytes": max(r[0] for r in rows),
        "largest_request_gb_s": max(rows)[3],
    }


def transfer_metrics(url: str) -> dict:
    """The `pegboard:kv_transfer*` series of a server's /metrics, summed over labels but
    `result` (transfers ok / failed)."""
    text = httpx.get(url + "/metrics", timeout=30).text
    out: dict[str, float] = {}
    for name, labels, value in METRIC_LINE.findall(text):
        if name.endswith(("_bucket", "_created")):
            continue
        if "result=" in labels:
            name += "_" + re.search(r'result="(\w+)"', labels).group(1)
        out[name] = out.get(name, 0.0) + float(value)
    return out


METRIC_LINE = re.compile(r"^pegboard:(kv_transfer\w*?)(\{[^}]*\})? ([0-9.e+-]+)$", re.M)


def main() -> None:
    from pegboard.core.bench.models import random_weights_model_dir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--model", default=None, help="a checkpoint folder instead of --config's")
    p.add_argument("--backend", default="mooncake", choices=["mooncake", "nixl"])
    p.add_argument("--setups", default="colocated,pd,dp2")
    p.add_argument("--check-prompts", type=int, default=8)
    p.add_argument("--check-len", type=int, default=600, help="longest check prompt")
    p.add_argument("--streams", type=int, default=64)
    p.add_argument("--stream-tokens", type=int, default=512)
    p.add_argument("--long-prompts", type=int, default=8)
    p.add_argument("--long-len", type=int, default=8000)
    p.add_argument("--long-delay", type=float, default=2.0)
    p.add_argument("--long-gap", type=float, default=0.5)
    p.add_argument("--max-token-id", type=int, default=30000)
    p.add_argument("--server-args", default="", help="more `pegboard serve` flags")
    p.add_argument(
        "--pd-args",
        default="",
        help="more flags for the prefill and decode servers only, e.g. the transfer plugin's "
        "options (`--mooncake-protocol nvlink_intra`)",
    )
    p.add_argument("--json", default=None, metavar="FILE", help="write the result here too")
    args = p.parse_args()
    model_dir = args.model or str(random_weights_model_dir(args.config))
    logdir = os.environ.get("OUT") or tempfile.mkdtemp(prefix="bench-pd-")
    os.makedirs(logdir, exist_ok=True)
    results = {"config": args.model or args.config, "backend": args.backend}
    for setup in args.setups.split(","):
        url, procs = start(
            setup, model_dir, args.backend, logdir, args.server_args.split(), args.pd_args.split()
        )
        try:
            results[setup] = asyncio.run(workload(url, args))
            if setup == "pd":
                results[setup]["kv_transfer"] = transfer_stats(procs[0].log())
                for name, proc in (("prefill", procs[0]), ("decode", procs[1])):
                    results[setup][f"{name}_metrics"] = transfer_metrics(proc.url)
        finally:
            stop_all(procs)
        print(f"{setup}: done", file=sys.stderr, flush=True)
        report(results, args.json)  # so far: a run cut short keeps the finished setups
    print(json.dumps(report(results, args.json), indent=2))


def report(results: dict, path: str | None) -> dict:
    """`results` with each setup's outputs replaced by how many equal colocated's."""
    base = results.get("colocated", {}).get("outputs")
    out = {}
    for key, value in results.items():
        if isinstance(value, dict) and "outputs" in value:
            value = dict(value)
            outs = value.pop("outputs")
            if base is not None:
                value["outputs_equal_colocated"] = sum(a == b for a, b in zip(outs, base))
                value["outputs_checked"] = len(base)
        out[key] = value
    if path:
        with open(path, "w") as f:
            f.write(json.dumps(out, indent=2) + "\n")
    return out


if __name__ == "__main__":
    main()
