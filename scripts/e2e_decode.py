"""End-to-end batch-1 decode timing shared by the kernel benchmarks (bench_fused, bench_gemv):
run `profile_decode.py` once per variant, each in its own process, and read its ms/token."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path


def run_e2e(
    command: list[str],
    variants: dict[str, tuple[list[str], dict[str, str]]],
    log_dir: Path | None,
    timeout: float,
    tail: int,
) -> dict[str, float | None]:
    """ms/token per variant (name: extra flags, extra environment); None where the run printed
    no figure. Each run's output goes to `log_dir/e2e-NAME.log` if given, its last `tail`
    characters to stdout."""
    results: dict[str, float | None] = {}
    for name, (flags, env) in variants.items():
        try:
            proc = subprocess.run(
                command + flags, capture_output=True, text=True, timeout=timeout,
                env=os.environ | env,
            )  # fmt: skip
            log = proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as e:
            log = f"timed out after {e.timeout} s"
        if log_dir is not None:
            (log_dir / f"e2e-{name}.log").write_text(log)
        found = re.search(r"([\d.]+) ms/token", log)
        results[name] = float(found.group(1)) if found else None
        print(f"e2e {name}: {log.strip()[-tail:]}", flush=True)
    return results
