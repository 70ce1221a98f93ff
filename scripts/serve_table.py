"""One line per `pegboard bench serve --json` file: completed, output tok/s, TTFT and ITL.

python3 scripts/serve_table.py out/serve-env-*.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    print(f"{'run':24} {'done':>8} {'out tok/s':>10}  TTFT mean / p50 / p99 ms   ITL mean / p99 ms")
    for name in sys.argv[1:]:
        d = json.loads(Path(name).read_text())
        t, i = d["ttft_ms"], d["itl_ms"]
        print(
            f"{Path(name).stem:24} {d['completed']:>4}/{d['requests']:<3} {d['output_tok_s']:10.1f}"
            f"  {t['mean']:7.1f} / {t['p50']:6.1f} / {t['p99']:6.1f}   {i['mean']:6.2f} / {i['p99']:6.2f}"
        )


if __name__ == "__main__":
    main()
