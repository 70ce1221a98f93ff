"""What each kind of kernel adds to a chain of kernels: a torch-profiler trace's device timeline
read as one critical path.

python3 scripts/trace_chain.py DIR/trace.json [--top 25] [--steps N]

A decode step at batch 1 (issue 17: Llama-3.1-8B at ~4.04 ms per token, goal 3.77) is one
stream of dependent kernels, many launched with programmatic dependent launch (PDL), so a
kernel may start before the one it waits for ends and its own duration overstates what it
costs the step. Here each kernel is charged only the time by which it pushes the chain's end
further: `max(0, end - latest end so far)`, and the device's idle time (a kernel starting after
every earlier one ended) is charged to the gap before that kernel. Summed per kernel name over
the window (the `pegboard bench offline --torch-profile DIR` window; `--steps` divides the sums
into per-step figures), that says what removing or fusing a kind of kernel can save at most,
which the kernels' own durations (`kernels.txt`) do not.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict

from trace_steps import DEVICE_CATEGORIES  # scripts/trace_steps.py (same folder)


def chain(events: list[dict]) -> dict[str, dict[str, float]]:
    """Per device event name: count, summed duration, summed time added to the chain's end,
    summed idle time before it (µs); and under "(window)" the span from the first start to the
    last end."""
    device = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATEGORIES),
        key=lambda e: e["ts"],
    )
    rows: dict[str, dict[str, float]] = defaultdict(
        lambda: {"count": 0, "duration": 0.0, "added": 0.0, "idle_before": 0.0}
    )
    if not device:
        return {}
    first, latest = device[0]["ts"], device[0]["ts"]
    for e in device:
        start, end = e["ts"], e["ts"] + e.get("dur", 0.0)
        row = rows[e["name"]]
        row["count"] += 1
        row["duration"] += end - start
        row["idle_before"] += max(0.0, start - latest)
        row["added"] += max(0.0, end - max(latest, start))
        latest = max(latest, end)
    rows["(window)"] = {"count": len(device), "duration": latest - first, "added": 0.0,
                        "idle_before": 0.0}  # fmt: skip
    return dict(rows)


def table(rows: dict[str, dict[str, float]], steps: int, top: int) -> str:
    window = rows.pop("(window)", None)
    if window is None:
        return "no device events in the trace"
    span = window["duration"]
    order = sorted(rows.items(), key=lambda kv: -(kv[1]["added"] + kv[1]["idle_before"]))
    lines = [
        f"{steps} step(s), {span / steps:.1f} µs of device timeline per step; per step:",
        f"{'kernel':60s} {'count':>7s} {'own µs':>9s} {'added µs':>9s} {'idle before':>11s} "
        f"{'share':>6s}",
    ]
    for name, r in order[:top]:
        charged = r["added"] + r["idle_before"]
        lines.append(
            f"{name[:60]:60s} {r['count'] / steps:7.1f} {r['duration'] / steps:9.1f} "
            f"{r['added'] / steps:9.1f} {r['idle_before'] / steps:11.1f} "
            f"{100 * charged / span:5.1f}%"
        )
    added = sum(r["added"] for r in rows.values())
    idle = sum(r["idle_before"] for r in rows.values())
    lines.append(
        f"{'(all)':60s} {sum(r['count'] for r in rows.values()) / steps:7.1f} "
        f"{sum(r['duration'] for r in rows.values()) / steps:9.1f} {added / steps:9.1f} "
        f"{idle / steps:11.1f}"
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("trace", help="trace.json of `bench offline --torch-profile DIR`")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--steps", type=int, default=None, help="steps in the window (default: "
                   "the trace's ProfilerStep annotations)")  # fmt: skip
    args = p.parse_args()
    with open(args.trace) as f:
        trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    steps = args.steps or sum(
        1
        for e in events
        if str(e.get("name", "")).startswith("ProfilerStep#")
        and e.get("cat") == "gpu_user_annotation"
    )
    print(table(chain(events), max(steps, 1), args.top))


if __name__ == "__main__":
    main()
