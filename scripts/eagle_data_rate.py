"""Tokens/s of `pegboard spec train-eagle3`'s data generation (`eagle_data.generate_data`),
batched (`--gen-batch`, default 64 requests at once) vs one request at a time, on any model:

    python scripts/eagle_data_rate.py --model DIR [--device cpu] [--samples 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path


def main() -> None:
    from pegboard.core.speculative.eagle_data import generate_data

    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--gen-batch", type=int, default=64)
    a = p.parse_args()
    result = {}
    for batch in (a.gen_batch, 1):
        args = argparse.Namespace(model=a.model, prompts=None, num_samples=a.samples,
                                  heldout_prompts=0, max_new_tokens=a.max_new_tokens,
                                  temperature="0.8", gen_batch=batch, gen_chunk=4096,
                                  data_minutes=60.0, dtype=a.dtype, device=a.device, seed=0)  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            _, _, stats = generate_data(args, Path(out))
        result[f"gen_batch_{batch}"] = stats
    result["batched_speedup"] = round(
        result[f"gen_batch_{a.gen_batch}"]["tokens_per_s"] / result["gen_batch_1"]["tokens_per_s"],
        2,
    )
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
