"""Per engine step of a torch-profiler trace: host time, device time, and where the host waited.

python3 scripts/trace_steps.py DIR/trace.json [--top 4]

Reads the Chrome trace `pegboard bench offline --torch-profile DIR` writes and prints one row
per recorded step (`ProfilerStep#N`): the step's host span, the device's busy time for the work
launched in that step (kernels, copies and memsets, attributed to the step through the CUDA
runtime call that launched them), the number of launches, and the longest CUDA runtime calls
of the step — a synchronize or a pageable copy there is the host waiting for the device.
Why: `HostProfile` books a host stall as host work of the phase that made it; this separates
a step that is slow on the device from one whose host blocks (issue 17's opening steps).
"""

from __future__ import annotations

import argparse
import bisect
import json
from collections import defaultdict

DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def step_rows(trace: dict, top: int = 4) -> list[dict]:
    events = [e for e in trace.get("traceEvents", []) if e.get("ph") == "X"]
    steps = sorted(
        (  # the host's step spans (the trace also has each step's span on the GPU timeline)
            e
            for e in events
            if str(e.get("name", "")).startswith("ProfilerStep#")
            and e.get("cat") != "gpu_user_annotation"
        ),
        key=lambda e: e["ts"],
    )
    starts = [s["ts"] for s in steps]

    def step_of(ts: float) -> int | None:
        i = bisect.bisect_right(starts, ts) - 1
        if i >= 0 and ts <= steps[i]["ts"] + steps[i]["dur"]:
            return i
        return None

    launch_step: dict[int, int] = {}
    runtime: dict[int, list[tuple[float, str]]] = defaultdict(list)
    for e in events:
        if e.get("cat") != "cuda_runtime" and e.get("cat") != "cuda_driver":
            continue
        i = step_of(e["ts"])
        if i is None:
            continue
        runtime[i].append((e["dur"], e["name"]))
        corr = e.get("args", {}).get("correlation")
        if corr is not None:
            launch_step[corr] = i
    busy: dict[int, float] = defaultdict(float)
    launches: dict[int, int] = defaultdict(int)
    for e in events:
        if e.get("cat") not in DEVICE_CATEGORIES:
            continue
        i = launch_step.get(e.get("args", {}).get("correlation"))
        if i is not None:
            busy[i] += e["dur"]
            launches[i] += 1
    rows = []
    for i, s in enumerate(steps):
        calls = sorted(runtime[i], reverse=True)[:top]
        rows.append(
            {
                "step": s["name"].split("#")[1],
                "host_ms": s["dur"] / 1e3,
                "device_busy_ms": busy[i] / 1e3,
                "device_ops": launches[i],
                "longest_runtime_calls": [(name, round(d / 1e3, 3)) for d, name in calls],
            }
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("trace")
    ap.add_argument("--top", type=int, default=4)
    args = ap.parse_args()
    with open(args.trace) as f:
        rows = step_rows(json.load(f), args.top)
    print(
        f"{'step':>5} {'host ms':>9} {'device ms':>10} {'ops':>6}  longest CUDA runtime calls (ms)"
    )
    for r in rows:
        calls = ", ".join(f"{n} {d}" for n, d in r["longest_runtime_calls"])
        print(
            f"{r['step']:>5} {r['host_ms']:9.2f} {r['device_busy_ms']:10.2f} "
            f"{r['device_ops']:6d}  {calls}"
        )


if __name__ == "__main__":
    main()
