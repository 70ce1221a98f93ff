"""First-request TTFT of a fresh `pegboard serve`, with and without the warm-up request.

Each run starts a server with random weights of a bundled config (a fresh Triton cache
directory, so no run reuses another's compiled kernels), waits for /health 200, sends one
streamed completion and times its first token; then stops the server. Prints JSON:

    python scripts/bench_warmup_ttft.py --config qwen3-0.6b [--runs 2] [--server-args '...']
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_request_ttft(model_dir: str, warmup: bool, server_args: list[str]) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "pegboard.core.cli.main", "serve", "--model", model_dir,
           "--load-format", "dummy", "--served-model-name", "m", "--port", str(port),
           *([] if warmup else ["--skip-warmup"]), *server_args]  # fmt: skip
    env = {**os.environ, "TRITON_CACHE_DIR": tempfile.mkdtemp(prefix="triton-cache-")}
    started = time.perf_counter()
    server = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"server exited with {server.returncode}: {' '.join(cmd)}")
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        ready_s = time.perf_counter() - started
        body = {"model": "m", "prompt": [1 + i for i in range(256)], "max_tokens": 8,
                "stream": True, "ignore_eos": True}  # fmt: skip
        sent = time.perf_counter()
        ttft = None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and ttft is None and '"text"' in line:
                    ttft = time.perf_counter() - sent
        return {"warmup": warmup, "ready_s": round(ready_s, 2), "first_request_ttft_s": ttft}
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)


def main() -> int:
    from pegboard.core.bench.models import random_weights_model_dir

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--runs", type=int, default=1, help="runs of each mode")
    p.add_argument("--server-args", default="", help="more `pegboard serve` flags")
    args = p.parse_args()
    model_dir = str(random_weights_model_dir(args.config))
    results = []
    for _ in range(args.runs):
        for warmup in (False, True):
            results.append(first_request_ttft(model_dir, warmup, shlex.split(args.server_args)))
    print(json.dumps({"config": args.config, "runs": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
