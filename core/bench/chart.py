"""`--chart FILE.png` for `pegboard bench`: a small picture of a result.

offline: output tok/s of pegboard and, with `--peer`, of the peer engine, side by side.
serve:   p50 / p90 / p99 of TTFT and e2e latency (left) and of TPOT and ITL (right), in ms.

matplotlib is imported here only, when a chart is asked for (the engine never needs it;
it is in the `dev` extra).
"""

from __future__ import annotations

from pathlib import Path

from pegboard.core.bench.serve import PERCENTILES


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise RuntimeError("--chart needs matplotlib: pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def offline_chart(result: dict, path: str | Path) -> Path:
    """Bars of output tok/s: pegboard, and the peer if the result has one."""
    plt = _pyplot()
    names = ["pegboard"]
    values = [result["output_tok_s"]]
    peer = result.get("peer")
    if peer is not None:
        names.append(f"{peer['engine']} {peer['version']}\n({peer['mode']})")
        values.append(peer["output_tok_s"])
    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    bars = ax.bar(names, values, color=["#3b6ea8", "#b0b0b0"][: len(values)])
    ax.bar_label(bars, labels=[f"{v:,.1f}" for v in values])
    ax.set_ylabel("output tok/s")
    ax.set_title(f"{result.get('model', '')} — {result.get('requests', '?')} sequences", fontsize=9)
    ax.margins(y=0.15)
    return _save(fig, plt, path)


def serve_chart(result: dict, path: str | Path) -> Path:
    """Latency percentiles: TTFT and e2e on one axis, TPOT and ITL on another (their scales
    differ by orders of magnitude)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(8, 3.5), dpi=100)
    for ax, metrics in zip(axes, (("ttft_ms", "e2e_ms"), ("tpot_ms", "itl_ms"))):
        width = 0.8 / len(PERCENTILES)
        for k, q in enumerate(PERCENTILES):
            values = [result[m][f"p{q}"] or 0.0 for m in metrics]
            xs = [i + (k - (len(PERCENTILES) - 1) / 2) * width for i in range(len(metrics))]
            ax.bar(xs, values, width, label=f"p{q}")
        ax.set_xticks(range(len(metrics)), [m.removesuffix("_ms").upper() for m in metrics])
        ax.set_ylabel("ms")
        ax.legend(fontsize=8)
    rate = result.get("request_rate")
    load = f"rate {rate}/s" if rate else f"concurrency {result.get('concurrency') or 'all'}"
    fig.suptitle(
        f"{result.get('model', '')}: {result['completed']}/{result['requests']} requests, "
        f"{load}, {result['output_tok_s']:,.1f} output tok/s",
        fontsize=9,
    )
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
