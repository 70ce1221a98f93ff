"""Which Triton specializations a run compiles after the engine's warm-up.

On a CPU (no GPU needed): the engine runs a varied workload under Triton's interpreter with
the GPU's start-up rehearsed (`pegboard.core.bench.triton_keys`), and every launch's CUDA JIT
key is recorded; prints the keys each phase met and those met only after the warm-up (each
one a compile, or a module load, in the middle of a GPU step). Exit status 1 if there are any.

    TRITON_INTERPRET=1 python scripts/triton_keys.py                 # defaults: 48 requests
    TRITON_INTERPRET=1 python scripts/triton_keys.py --requests 96 --all
    TRITON_INTERPRET=1 python scripts/triton_keys.py --set cuda_graph_max_bs=8 \\
        --set cuda_graph_mixed_max_tokens=64     # steps past the graphs run eagerly

On a GPU (`--gpu`): Qwen3-0.6B's shapes with random weights and the default graphs, 128
requests; prints every specialization compiled (or loaded from the disk cache) after start-up.

    python scripts/triton_keys.py --gpu
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _setting(text: str) -> tuple[str, object]:
    name, _, value = text.partition("=")
    try:
        return name, json.loads(value)
    except ValueError:
        return name, value


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, help="48 (on a GPU 128)")
    p.add_argument("--prompt-lens", type=int, nargs=2, help="1 200 (on a GPU 1 1024)")
    p.add_argument("--output-lens", type=int, nargs=2, help="1 12 (on a GPU 1 48)")
    p.add_argument("--set", type=_setting, action="append", default=[], metavar="FIELD=VALUE",
                   help="an EngineConfig field of the engine built (JSON value)")  # fmt: skip
    p.add_argument("--all", action="store_true", help="print every key met, by phase")
    p.add_argument("--gpu", action="store_true", help="count compiles on a GPU instead")
    args = p.parse_args()
    if not args.gpu and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("set TRITON_INTERPRET=1 (or pass --gpu on a GPU)")
    from pegboard.core.bench.triton_keys import Workload, count_gpu_compiles, record

    workload = Workload(128, (1, 1024), (1, 48)) if args.gpu else Workload()
    workload.num_requests = args.requests or workload.num_requests
    workload.prompt_lens = tuple(args.prompt_lens or workload.prompt_lens)
    workload.output_lens = tuple(args.output_lens or workload.output_lens)
    settings = dict(args.set)
    if args.gpu:
        compiled, n = count_gpu_compiles(workload, **settings)
        print(f"{n} requests; {len(compiled)} Triton specializations compiled after start-up")
        for kernel, description in compiled:
            print(f"  {kernel}: {description}")
        return 1 if compiled else 0
    recorder, outs = record(workload, **settings)
    for phase, counts in recorder.phases.items():
        print(f"{phase}: {sum(counts.values())} launches, {len(counts)} keys")
        if args.all:
            for key, count in sorted(counts.items()):
                print(f"  {count:6d}  {key}")
    new = recorder.new_keys()
    print(f"{len(outs)} requests; {len(new)} keys met after the warm-up")
    for key in new:
        print(f"  {recorder.phases['run'][key]:6d}  {key}")
    return 1 if new else 0


if __name__ == "__main__":
    sys.exit(main())
