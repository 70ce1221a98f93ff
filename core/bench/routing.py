"""`pegboard bench prefix --router-policies cache_aware,round_robin`: the shared-prefix
workload over HTTP through `pegboard serve --dp-size N` (N replicas behind the router), once
per routing policy — SGLang's router benchmark: the workers' prefix-cache hit rate (from each
worker's `GET /load`) and throughput, per policy.

Each policy gets fresh replicas (empty caches). The replicas use a prefix cache (`--kv-cache
radix` unless `--kv-cache` names another) and the model and engine flags given to `bench
prefix`; `--router-server-args` adds more `pegboard serve` flags.
"""

from __future__ import annotations

import argparse
import asyncio
import shlex
import subprocess
import sys
import time

import httpx
from pegboard.core.bench.serve import discover_model, send_request, summarize, wait_ready

#: Engine flags of `bench prefix` passed on to the replicas (destination -> flag).
_PASSED = {
    "dtype": "--dtype",
    "device": "--device",
    "scheduler": "--scheduler",
    "kv_cache_tokens": "--kv-cache-tokens",
    "max_running_requests": "--max-running-requests",
    "max_num_batched_tokens": "--max-num-batched-tokens",
    "page_size": "--page-size",
}


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    r = p.add_argument_group(
        "through the router",
        "Send the workload over HTTP to `pegboard serve --dp-size N`, once per policy.",
    )
    r.add_argument(
        "--router-policies",
        default=None,
        metavar="P1,P2",
        help="routing policies to compare, e.g. cache_aware,round_robin",
    )
    r.add_argument("--router-dp-size", type=int, default=2, metavar="N", help="replicas (2)")
    r.add_argument(
        "--router-server-args", default="", metavar="'FLAGS'", help="more `pegboard serve` flags"
    )
    r.add_argument(
        "--router-timeout", type=float, default=1800.0, metavar="S", help="bound per policy"
    )


def serve_command(args: argparse.Namespace, model: str, dummy: bool) -> list[str]:
    """The `pegboard serve` command of the replicas (without port, policy and dp size)."""
    cmd = [sys.executable, "-m", "pegboard.core.cli.main", "serve", "--model", model]
    cmd += ["--kv-cache", getattr(args, "kv_cache", None) or "radix"]
    if dummy:
        cmd += ["--load-format", "dummy"]
    for dest, flag in _PASSED.items():
        value = getattr(args, dest, None)
        if value is not None:
            cmd += [flag, str(value)]
    return cmd + shlex.split(args.router_server_args)


def run_router_bench(
    workload, policies: list[str], serve: list[str], dp_size: int, timeout: float
) -> dict:
    """Per policy: start the replicas and router, send the workload all at once, read the
    workers' hit counters, stop them. Returns the figures per policy and cache-aware's
    throughput over round-robin's when both ran."""
    from pegboard.core.router.replicas import free_port, stop_replicas

    results = {}
    for policy in policies:
        port = free_port()
        cmd = [*serve, "--dp-size", str(dp_size), "--router-policy", policy, "--port", str(port)]
        print(f"pegboard bench prefix: starting {shlex.join(cmd)}", file=sys.stderr)
        server = subprocess.Popen(cmd)
        try:
            results[policy] = asyncio.run(
                asyncio.wait_for(_drive(f"http://127.0.0.1:{port}", workload, server), timeout)
            )
        finally:
            stop_replicas([server], timeout=120)
    out = {"dp_size": dp_size, "policies": results}
    if {"cache_aware", "round_robin"} <= results.keys():
        base = results["round_robin"]["output_tok_s"]
        out["cache_aware_vs_round_robin"] = (
            round(results["cache_aware"]["output_tok_s"] / base, 2) if base else None
        )
    return out


async def _drive(url: str, workload, server: subprocess.Popen) -> dict:
    prompts, params = workload.build()
    limits = httpx.Limits(max_connections=len(prompts))
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(None, connect=10.0), limits=limits
    ) as client:

        def gone() -> str | None:
            if server.poll() is None:
                return None
            return f"pegboard serve exited with code {server.returncode} before it was ready"

        await wait_ready(client, url, 900.0, gone)
        model = await discover_model(client, url)
        start = time.perf_counter()
        records = await asyncio.gather(
            *(send_request(client, url, model, p, workload.output_len, 0.0) for p in prompts)
        )
        elapsed = time.perf_counter() - start
        pool = (await client.get(url + "/workers")).json()
        loads = [(await client.get(w["url"] + "/load")).json() for w in pool["workers"]]
    summary = summarize(list(records), elapsed)
    hits = sum(load.get("prefix_hit_tokens", 0) for load in loads)
    queries = sum(load.get("prefix_query_tokens", 0) for load in loads)
    stats = pool["policy_stats"]
    estimate = (
        stats.get("cache_hit_chars", 0) / stats["cache_query_chars"]
        if stats.get("cache_query_chars")
        else None
    )
    return {
        "hit_rate": round(hits / queries, 4) if queries else 0.0,
        "prefix_hit_tokens": hits,
        "prefix_query_tokens": queries,
        "router_hit_estimate": None if estimate is None else round(estimate, 4),
        "routed": [w["routed"] for w in pool["workers"]],
        **{k: summary[k] for k in ("completed", "failed", "errors", "elapsed_s")},
        **{k: summary[k] for k in ("output_tok_s", "total_tok_s", "ttft_ms", "e2e_ms")},
    }


def run_router_prefix_cmd(args: argparse.Namespace) -> int:
    """`bench prefix --router-policies ...`: the model from `--model` or `--random-weights
    --config`, then `run_router_bench`; prints the JSON result."""
    from pegboard.core.bench.models import random_weights_model_dir
    from pegboard.core.bench.prefix import workload_from_args

    policies = [p.strip() for p in args.router_policies.split(",") if p.strip()]
    if not policies or args.router_dp_size < 1:
        print("pegboard bench prefix: --router-policies needs names, --router-dp-size >= 1",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.random_weights:
        if not args.config:
            print("pegboard bench prefix: --random-weights needs --config NAME", file=sys.stderr)
            return 2
        model, dummy = str(random_weights_model_dir(args.config)), True
    elif args.model:
        model, dummy = args.model, False
    else:
        print("pegboard bench prefix: --router-policies needs --model or --random-weights",
              file=sys.stderr)  # fmt: skip
        return 2
    workload = workload_from_args(args)
    result = run_router_bench(
        workload, policies, serve_command(args, model, dummy), args.router_dp_size,
        args.router_timeout,
    )  # fmt: skip
    from dataclasses import asdict

    from pegboard.core.cli.bench import _emit

    result = {
        "kind": "prefix-router",
        "workload": asdict(workload),
        "model": args.config or model,
    } | result
    _emit(result, args.json)
    return 0
