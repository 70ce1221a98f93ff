"""What an n-gram `propose` for 64 requests costs after a stretch without drafts, on a CPU.

    PYTHONPATH=DIR python3 scripts/ngram_lookup_cost.py [--requests 64] [--prompt 128]

Each request has a random 128-token prompt (Qwen3's vocabulary) and is looked up once; then
`gap` tokens are appended (the steps the on/off switch kept speculation off decode them without
asking the speculator) and the next lookup, the probe's, is timed (wall ms, best of 5; `fresh`:
the first lookup of new requests). A drafting step's lookup is the `gap 5` row. Another tree's
speculator with `PYTHONPATH=DIR` (DIR/pegboard that checkout), as scripts/spec_schedule_cpu.py.
"""

from __future__ import annotations

import argparse
import json
import random
import time

from pegboard.plugins.speculative.ngram import NgramOptions, NgramSpeculator
from pegboard.sdk.types import Request, SamplingParams


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--prompt", type=int, default=128)
    args = p.parse_args()
    speculator = NgramSpeculator.__new__(NgramSpeculator)  # (no engine context needed)
    speculator.options = NgramOptions()
    rng = random.Random(0)
    result = {}
    for gap in (None, 5, 16, 64, 128, 256):
        runs = []
        for _ in range(5):
            requests = [
                Request([rng.randrange(151_000) for _ in range(args.prompt)], SamplingParams())
                for _ in range(args.requests)
            ]
            if gap is not None:
                speculator.propose(requests, [4] * len(requests))
                for r in requests:
                    r.token_ids.extend(rng.randrange(151_000) for _ in range(gap))
            start = time.perf_counter()
            speculator.propose(requests, [4] * len(requests))
            runs.append(time.perf_counter() - start)
        result["fresh" if gap is None else f"gap {gap}"] = round(min(runs) * 1e3, 3)
    print(json.dumps({"propose_ms": result}, indent=1))


if __name__ == "__main__":
    main()
