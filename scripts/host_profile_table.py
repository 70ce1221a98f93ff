"""One row per `bench offline --profile-host` JSON: throughput, host and wait ms per step, host
ms of decode and mixed steps, and the phases issue 17 works on (prepare, attention.prepare,
sample and its Gumbel part, resolve less its wait for the tokens, detokenize's take).

python3 scripts/host_profile_table.py FILE.json [FILE.json ...]
"""

from __future__ import annotations

import json
import os
import sys

COLUMNS = (  # (header, the phase in `ms_per_step`)
    ("prepare", "prepare"),
    ("attn.prep", "forward: attention.prepare"),
    ("sample", "sample"),
    ("gumbel", "sample: gumbel"),
    ("resolve", "resolve (all)"),  # less "resolve: wait for tokens" (in `wait`)
    ("take", "detokenize: take (between steps)"),
)


def row(path: str) -> str:
    d = json.load(open(path))
    h = d["host_profile"]
    ms, kinds = dict(h["ms_per_step"]), h.get("host_ms_by_kind", {})
    ms["resolve (all)"] = ms.get("resolve (all)", 0.0) - ms.get("resolve: wait for tokens", 0.0)
    kind = {k: kinds.get(k, {}).get("host_ms_per_step", float("nan")) for k in ("decode", "mixed")}
    name = os.path.basename(path).removesuffix(".json")
    phases = "".join(f"{ms.get(p, float('nan')):>10.3f}" for _, p in COLUMNS)
    return (
        f"{name:<28}{d['output_tok_s']:>10.1f}{h['host_ms_per_step']:>9.3f}"
        f"{h['device_wait_ms_per_step']:>7.3f}{kind['decode']:>8.3f}{kind['mixed']:>8.2f}{phases}"
    )


def main() -> None:
    head = f"{'run':<28}{'tok/s':>10}{'host ms':>9}{'wait':>7}{'decode':>8}{'mixed':>8}"
    print(head + "".join(f"{h:>10}" for h, _ in COLUMNS))
    for path in sys.argv[1:]:
        print(row(path))


if __name__ == "__main__":
    main()
