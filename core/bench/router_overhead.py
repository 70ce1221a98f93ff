"""What the router adds to time-to-first-token on loopback: the same streamed requests sent
to a worker directly and through `pegboard router` in front of it, alternated one at a time
(so drift in the worker's speed hits both alike), compared by their TTFT percentiles and by
the median of the paired differences.

    pegboard serve --model DIR --port 8001 &
    python -m pegboard.core.bench.router_overhead --worker http://127.0.0.1:8001 -n 300

The router is started here (`pegboard router --worker URL`, round robin over one worker) and
stopped afterwards. Requests: a short text prompt, `max_tokens` 1, greedy, streamed.

`--stub-worker` (instead of `--worker`) starts a stub worker that answers at once (one SSE
event and `[DONE]`, no model): the difference is then the router's cost alone, not diluted by
an engine competing for the same cores. `--router-python PY` starts the router with another
interpreter (another checkout's venv), to compare two versions with the same command:

    python -m pegboard.core.bench.router_overhead --stub-worker -n 1000
    python -m pegboard.core.bench.router_overhead --stub-worker -n 1000 \
        --router-python /path/to/other/.venv/bin/python
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import httpx
from pegboard.core.bench.serve import (
    check_loopback,
    discover_model,
    latency_summary,
    send_request,
    wait_ready,
)
from pegboard.core.router.http import HTTPServer, Request, Response, json_response


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid` (Linux `/proc`), None where unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(
    worker: str, router: str, n: int, warmup: int = 10, router_pid: int | None = None
) -> dict:
    """TTFT of `n` requests each way, alternating direct and routed; with `router_pid`, also
    the router's CPU time per request (what it adds when the machine is not busy: on a loaded
    machine the wall-clock difference also counts waits for a core)."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(60.0, connect=10.0)) as client:
        await wait_ready(client, worker, 300.0)
        await wait_ready(client, router, 60.0)
        model = await discover_model(client, worker)
        ttft: dict[str, list[float]] = {"direct": [], "router": []}
        cpu_start = None
        for i in range(warmup + n):
            if i == warmup and router_pid is not None:
                cpu_start = cpu_seconds(router_pid)
            for name, base in (("direct", worker), ("router", router)):
                prompt = f"request {i}: say something"
                record = await send_request(client, base, model, prompt, 1, 0.0)
                if record.error:
                    raise RuntimeError(f"{name} request failed: {record.error}")
                if i >= warmup:
                    ttft[name].append(record.ttft)
    cpu_end = cpu_seconds(router_pid) if router_pid is not None else None
    cpu_ms = None if cpu_start is None or cpu_end is None else (cpu_end - cpu_start) * 1000 / n
    paired = [(r - d) * 1000 for d, r in zip(ttft["direct"], ttft["router"])]
    direct, routed = latency_summary(ttft["direct"]), latency_summary(ttft["router"])
    return {
        "kind": "router-overhead",
        "requests_each": n,
        "ttft_ms_direct": direct,
        "ttft_ms_router": routed,
        "p50_added_ms": round(routed["p50"] - direct["p50"], 3),
        "median_paired_added_ms": round(statistics.median(paired), 3),
        "router_cpu_ms_per_request": None if cpu_ms is None else round(cpu_ms, 3),
        "load_average_1m": round(os.getloadavg()[0], 2),
        "cpus": os.cpu_count(),
    }


async def stub_worker(request: Request) -> Response:
    """A worker that answers at once: JSON for GETs, one SSE event and `[DONE]` for a POST."""
    if request.method == "GET":
        return json_response({"data": [{"id": "stub"}], "num_requests": 0, "num_tokens": 0})
    event = {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}]}

    async def chunks():
        yield f"data: {json.dumps(event)}\n\n".encode()
        yield b"data: [DONE]\n\n"

    return Response(200, media_type="text/event-stream", chunks=chunks())


async def _serve_stub(port: int) -> None:
    server = HTTPServer(stub_worker)
    await server.start("127.0.0.1", port)
    await asyncio.Event().wait()


def main(argv: list[str] | None = None) -> int:
    from pegboard.core.router.replicas import free_port, stop_replicas

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--worker", help="a running server on this machine")
    g.add_argument("--stub-worker", action="store_true", help="measure against a stub worker")
    g.add_argument("--serve-stub", type=int, metavar="PORT", help=argparse.SUPPRESS)
    p.add_argument("-n", type=int, default=200, help="requests each way (default 200)")
    p.add_argument("--router-python", default=sys.executable, help="interpreter of the router")
    p.add_argument("--json", default=None, metavar="FILE", help="write the result here too")
    args = p.parse_args(argv)
    if args.serve_stub:
        asyncio.run(_serve_stub(args.serve_stub))
        return 0
    children = []
    if args.stub_worker:
        stub_port = free_port()
        children.append(subprocess.Popen([sys.executable, "-m", __spec__.name, "--serve-stub",
                                          str(stub_port)]))  # fmt: skip
        worker = f"http://127.0.0.1:{stub_port}"
    else:
        try:
            worker = check_loopback(args.worker)
        except ValueError as e:
            p.error(str(e))
    port = free_port()
    router = subprocess.Popen(
        [args.router_python, "-m", "pegboard.core.cli.main", "router", "--worker", worker,
         "--port", str(port), "--log-level", "warning"]
    )  # fmt: skip
    children.append(router)
    try:
        result = asyncio.run(
            measure(worker, f"http://127.0.0.1:{port}", args.n, router_pid=router.pid)
        )
    finally:
        stop_replicas(children, timeout=30)
    result["worker"] = "stub" if args.stub_worker else worker
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
