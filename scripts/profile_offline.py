"""Where the host's time goes in the offline throughput workload: per-phase ms per step.

python3 scripts/profile_offline.py --config qwen3-0.6b [--num-seqs 256] [engine flags as
    key=value: attention=triton disable_overlap=true ...]

Wraps the engine's phases with wall-clock timers (`pegboard.core.bench.host_profile`, as
`pegboard bench offline --profile-host`) and runs the nano-vllm workload once after a
warm-up. With overlap on, "wait for tokens" is the time the host had nothing to do (the device
was the bottleneck); the other phases are host work.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from pegboard.core.bench.host_profile import HostProfile
from pegboard.core.bench.models import config_model_dir
from pegboard.core.bench.offline import OfflineWorkload
from pegboard.core.llm import LLM


def parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    try:
        return int(v)
    except ValueError:
        return v


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", default="qwen3-0.6b")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-output", type=int, default=1024)
    p.add_argument("--json", default=None)
    p.add_argument("settings", nargs="*", help="engine settings as key=value")
    args = p.parse_args()
    settings = dict(s.split("=", 1) for s in args.settings)
    settings = {k: parse_value(v) for k, v in settings.items()}
    llm = LLM(str(config_model_dir(args.config)), load_format="dummy", **settings)
    workload = OfflineWorkload(num_seqs=args.num_seqs, max_output=args.max_output)
    prompts, params = workload.build()
    llm.generate([prompts[0][:16]], params[0])  # warm-up

    torch.cuda.synchronize()
    with HostProfile(llm.engine) as profile:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, progress=False)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    out_tokens = sum(len(o.token_ids) for o in outs)
    result = {
        "settings": settings,
        "elapsed_s": round(elapsed, 2),
        "output_tok_s": round(out_tokens / elapsed, 1),
    } | profile.report()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
