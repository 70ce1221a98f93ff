"""Host time of an EAGLE-3 verify step at batch 1 (issue 14), with no model files.

python3 scripts/profile_spec_host.py [--config smollm2-135m] [--k 4] [--num-seqs 2]
    [--max-tokens 256] [--input-len 128] [--top 40] [--num-layers N] [--json FILE]
    [--variants plain,eagle[,eagle-host,eagle-off,eagle-switch]] [--keep-backoff] [--torch-profile DIR] [engine settings as key=value ...]

A random-weight target from a bundled config (`--random-weights --config`'s names; SmolLM2-135M
by default) and a random EAGLE-3 head of SGLang's format for it (`train_eagle3.head_config`:
SGLang's auxiliary layers, a full-vocabulary LM head, as the head trained for the bundled
SmolLM2), written to a temporary directory. Per variant (`plain`: no speculator; `eagle`: the
head drafting a chain of `--k` tokens with the switch's rules off, `--speculative-min-speedup 0
--speculative-min-accept-rate 0`, and no back-off: `BACKOFF_AFTER_MISSES` raised, so every
decode step verifies `k` drafts although random weights accept few, its chains handed to the
core on the device; `eagle-host`: the same with `device_drafts` off, the chains read in
`propose` as before issue 14's device drafts; `eagle-off`: every step switched off by the
batch rule, `--speculative-disable-by-batch-size 1`, what an off step costs beside a plain
one; `eagle-switch`: the switch's rules and the back-off as by default, so a head that misses
is switched off and probed again, each probe catching up on the tokens decoded meanwhile), batch-1 greedy decode of
`--num-seqs` prompts one after another, CUDA graphs on where the device has them
(`--cuda-graph-max-bs 1`: decode, verify and drafting graphs):

1. a timed pass under `HostProfile` (wall clock, `bench offline --profile-host`'s phases, plus
   the EAGLE path's parts: `eagle: ...`): host ms per step by step kind, ms per phase;
2. the same requests again under `cProfile`, enabled only for decode/verify steps (each
   request's prefill runs first, unprofiled): the top `--top` functions by own time, and by
   cumulative time within the propose / mark_rows / verify paths (a function's time counted
   from the calls made inside those paths only), in µs per step.

On a CPU (no graphs: the eager path) shrink it to check that it runs, e.g. `--num-layers 2
--max-tokens 24 --num-seqs 1 --input-len 32`. `--stub-drafting-graphs` (CPU) measures the host
side of the GPU's drafting path there: the head's drafting graphs allowed, their metadata
prepared by the Triton backend on CPU tensors (`TRITON_INTERPRET=1`), each replay doing
nothing (the drafts stay 0: all rejected); `--thread-clock` times phases with the thread's CPU
clock (a shared machine's other load stays out), e.g. `--config DIR --stub-drafting-graphs
--thread-clock` with a tiny config.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import pstats
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from pegboard.core.bench.host_profile import SPEC_WAIT, HostProfile
from pegboard.core.bench.models import random_weights_model_dir
from pegboard.core.llm import LLM
from pegboard.core.speculative import step as spec_step
from pegboard.core.speculative.train_eagle3 import default_aux, head_config
from pegboard.sdk.types import Request, SamplingParams
from safetensors.torch import save_file

#: The host waiting for the drafting graph (`EagleSpeculator.read_drafts`, variant
#: `eagle-host`; 0 with the default device drafts, whose wait is part of `read_tokens`'):
#: `HostProfile` counts it as host work; `verify_step_ms` below takes it out.
DRAFT_WAIT = "eagle: read_drafts (wait for the drafts)"


def verify_step_ms(report: dict) -> dict | None:
    """A verify step's host work less both waits (for the drafts, for the target's tokens),
    and the waits, in ms per verify step (waits happen in verify steps only)."""
    verify = report["host_ms_by_kind"].get("verify")
    if not verify:
        return None
    scale = report["steps"] / verify["steps"]
    drafts = report["ms_per_step"].get(DRAFT_WAIT, 0.0) * scale
    tokens = report["ms_per_step"].get(SPEC_WAIT, 0.0) * scale
    return {
        "host_less_waits": round(verify["host_ms_per_step"] - drafts, 3),
        "wait_for_drafts": round(drafts, 3),
        "wait_for_target_tokens": round(tokens, 3),
    }


def random_eagle3_head(path: Path, target: dict, seed: int = 0, std: float = 0.02) -> Path:
    """An EAGLE-3 head for `target` (a config dict) in SGLang's format, random weights (norms at
    one, `d2t` zero: the draft vocabulary is the target's)."""
    cfg = head_config(target, default_aux(target["num_hidden_layers"]))
    h, inter = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = (
        cfg["num_attention_heads"] * cfg["head_dim"],
        cfg["num_key_value_heads"] * cfg["head_dim"],
    )
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    m = "midlayer."
    tensors = {
        "fc.weight": w(h, 3 * cfg["target_hidden_size"]),
        m + "hidden_norm.weight": torch.ones(h),
        m + "input_layernorm.weight": torch.ones(h),
        m + "post_attention_layernorm.weight": torch.ones(h),
        m + "self_attn.q_proj.weight": w(q, 2 * h),
        m + "self_attn.k_proj.weight": w(kv, 2 * h),
        m + "self_attn.v_proj.weight": w(kv, 2 * h),
        m + "self_attn.o_proj.weight": w(h, q),
        m + "mlp.gate_proj.weight": w(inter, h),
        m + "mlp.up_proj.weight": w(inter, h),
        m + "mlp.down_proj.weight": w(h, inter),
        "norm.weight": torch.ones(h),
        "lm_head.weight": w(cfg["draft_vocab_size"], h),
        "d2t": torch.zeros(cfg["draft_vocab_size"], dtype=torch.int64),
    }
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def eagle_parts(prof: HostProfile, engine) -> None:
    """Time the EAGLE path's parts too (put back with the profile's own wraps)."""
    spec = engine.speculation
    speculator = spec.speculator
    if spec._hidden is not None:
        prof._wrap(spec._hidden, "hand_out", "eagle: hand_out (target features)")
        prof._wrap(spec._hidden, "distribute", "eagle: distribute (logged features)")
    prof._wrap(speculator, "_ingest", "eagle: _ingest")
    if hasattr(speculator, "read_drafts"):  # (the host waits for the drafting graph there)
        prof._wrap(speculator, "read_drafts", DRAFT_WAIT)
    prof._wrap(speculator, "_catch_up", "eagle: _catch_up")
    prof._wrap(speculator, "_feed", "eagle: _feed (eager head forward)")
    if speculator.graphs is not None:
        prof._wrap(speculator.graphs, "run", "eagle: graphs.run (inputs, prepares, replay)")
        graphs = speculator.graphs
        if hasattr(graphs, "feed"):  # (an older tree's: the catch-up's inputs and prepare)
            prof._wrap(graphs.feed, "load", "eagle: graphs.feed.load")
        for i, backend in enumerate([getattr(graphs, "catch_up", None), *graphs.backends]):
            if backend is not None:
                prof._wrap(backend, "prepare", f"eagle: graphs backend {i} prepare")
        for graph in speculator.graphs.graphs.values():
            with contextlib.suppress(AttributeError, TypeError):
                prof._wrap(graph, "replay", "eagle: drafting graph replay (launch)")
    prof._wrap(spec_step, "check_drafts", "speculation: check_drafts")


class _NoReplay:
    def replay(self) -> None:  # the head's arithmetic: not host work
        pass


def stub_drafting_graphs() -> None:
    """CPU: let the EAGLE head capture drafting graphs whose replays do nothing."""
    from pegboard.plugins.speculative import eagle, head_graphs

    os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend's host side on CPU tensors
    eagle.graphs_supported = lambda kv: True
    head_graphs.DraftGraphs._capture = lambda self, size: _NoReplay()


def run_requests(engine, prompts, params, profile: SplitProfile | None = None) -> int:
    """Each prompt alone (batch 1): its prefill unprofiled, then its decode under `profile`;
    the output tokens."""
    tokens = 0
    for prompt in prompts:
        r = Request(list(prompt), params)
        engine.add_request(r)
        while r.num_output_tokens == 0 and engine.has_work():
            engine.step()
        if profile is not None:
            profile.enable()
        while engine.has_work():
            engine.step()
        if profile is not None:
            profile.disable()
        tokens += r.num_output_tokens
    return tokens


class OpCounter:
    """Torch operators called from the host (what a GPU run launches one by one: kernels,
    copies; a CUDA graph's replay is one call) inside `Speculation.propose`, `.mark_rows` and
    `Engine._verify`, and in the whole step, by phase and by operator."""

    def __init__(self, engine) -> None:
        self.by_phase: dict[str, int] = {}
        self.by_op: dict[str, int] = {}
        self._phase = ["step"]
        self._restore = []
        for owner, attr in ((engine.speculation, "propose"), (engine.speculation, "mark_rows"),
                            (engine, "_verify")):  # fmt: skip
            self._in_phase(owner, attr)

    def _in_phase(self, owner, attr: str) -> None:
        fn, phase = getattr(owner, attr), self._phase

        def counted(*args, **kwargs):
            phase.append(attr.lstrip("_"))
            try:
                return fn(*args, **kwargs)
            finally:
                phase.pop()

        setattr(owner, attr, counted)
        self._restore.append(lambda: delattr(owner, attr))

    def mode(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Count(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                phase = counter._phase[-1]
                counter.by_phase[phase] = counter.by_phase.get(phase, 0) + 1
                name = f"{phase}: {func}"
                counter.by_op[name] = counter.by_op.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        return Count()

    def close(self) -> None:
        while self._restore:
            self._restore.pop()()

    def report(self, steps: int) -> dict:
        per = 1 / max(steps, 1)
        ops = sorted(self.by_op.items(), key=lambda kv: -kv[1])[:40]
        return {
            "ops_per_step_by_phase": {k: round(v * per, 2) for k, v in self.by_phase.items()},
            "ops_per_step": {k: round(v * per, 2) for k, v in ops},
        }


class SplitProfile:
    """Two `cProfile`s over the step loop: `spec` while a speculative step's own work runs
    (`Speculation.propose`, `.mark_rows`, `Engine._verify`), `rest` the rest of the time, so that
    cumulative times inside the speculative paths count only calls made from there."""

    def __init__(self, engine) -> None:
        self.spec, self.rest = cProfile.Profile(), cProfile.Profile()
        self.active = False  # between `enable` and `disable` (steps outside are not profiled)
        self._restore = []
        for owner, attr in ((engine.speculation, "propose"), (engine.speculation, "mark_rows"),
                            (engine, "_verify")):  # fmt: skip
            self._switch(owner, attr)

    def _switch(self, owner, attr: str) -> None:
        fn = getattr(owner, attr)
        spec, rest = self.spec, self.rest

        def profiled(*args, **kwargs):
            # only while profiling: Python 3.12's cProfile refuses to enable a profiler that is
            # already on (one tool per process), 3.11 allowed it
            if not self.active:
                return fn(*args, **kwargs)
            rest.disable()
            spec.enable()
            try:
                return fn(*args, **kwargs)
            finally:
                spec.disable()
                rest.enable()

        setattr(owner, attr, profiled)
        self._restore.append(lambda: delattr(owner, attr))

    def enable(self) -> None:
        self.active = True
        self.rest.enable()

    def disable(self) -> None:
        self.rest.disable()
        self.active = False

    def close(self) -> None:
        while self._restore:
            self._restore.pop()()


def _name(func) -> str:
    file, line, name = func
    short = "/".join(Path(file).parts[-2:]) if file != "~" else ""
    return f"{short}:{line}({name})" if short else name


def profile_tables(prof: SplitProfile, steps: int, top: int) -> dict:
    spec = pstats.Stats(prof.spec) if prof.spec.getstats() else None
    stats = pstats.Stats(prof.rest)
    if spec is not None:
        stats.add(spec)
    per = 1e6 / max(steps, 1)
    own = sorted(stats.stats.items(), key=lambda kv: -kv[1][2])[:top]
    spec = sorted(spec.stats.items(), key=lambda kv: -kv[1][3])[:top] if spec else []
    return {
        "steps": steps,
        "tottime_us_per_step": [
            {
                "function": _name(f),
                "calls_per_step": round(v[1] / max(steps, 1), 2),
                "own_us": round(v[2] * per, 1),
                "cum_us": round(v[3] * per, 1),
            }
            for f, v in own
        ],  # fmt: skip
        "spec_cumtime_us_per_step": [
            {
                "function": _name(f),
                "calls_per_step": round(n / max(steps, 1), 2),
                "cum_us": round(ct * per, 1),
            }
            for f, (_, n, _, ct, _) in spec
        ],  # fmt: skip
    }


def print_tables(name: str, tables: dict) -> None:
    print(f"\n== {name}: top functions by own time, µs per decode/verify step "
          f"({tables['steps']} steps, under cProfile) ==")  # fmt: skip
    for row in tables["tottime_us_per_step"]:
        print(f"{row['own_us']:9.1f} own {row['cum_us']:9.1f} cum {row['calls_per_step']:7.2f}x  "
              f"{row['function']}")  # fmt: skip
    if tables["spec_cumtime_us_per_step"]:
        print(f"\n== {name}: cumulative time inside propose / mark_rows / verify, µs per step ==")
        for row in tables["spec_cumtime_us_per_step"]:
            print(f"{row['cum_us']:9.1f} cum {row['calls_per_step']:7.2f}x  {row['function']}")


def run_variant(
    name,
    model,
    settings,
    prompts,
    params,
    top,
    clock=time.perf_counter,
    count_ops=False,
    torch_profile=None,
) -> dict:
    cuda = torch.cuda.is_available() and settings.get("device", "auto") in ("auto", "cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    with LLM(model, **settings) as llm:
        e = llm.engine
        warm = SamplingParams(max_tokens=min(64, params.max_tokens), temperature=0.0,
                              ignore_eos=True)  # fmt: skip
        run_requests(e, prompts[:1], warm)  # warm-up: graphs, Triton compiles
        sync()
        before = e.speculation.stats()
        with HostProfile(e, clock=clock) as host:
            if e.speculation.speculator is not None:
                eagle_parts(host, e)
            start, steps0 = time.perf_counter(), e.num_steps
            tokens = run_requests(e, prompts, params)
            sync()
            elapsed = time.perf_counter() - start
        result = {
            "tok_s": round(tokens / elapsed, 1),
            "steps": e.num_steps - steps0,
            "ms_per_step": round(elapsed / max(e.num_steps - steps0, 1) * 1e3, 3),
            "speculation": e.speculation.report(before) if e.speculation.speculator else None,
            "cuda_graphs": _graphs(e),
            "host_profile": host.report(),
        }
        prof = SplitProfile(e)
        steps0 = e.num_steps
        run_requests(e, prompts, params, prof)
        prof.close()
        decode_steps = e.num_steps - steps0 - len(prompts)  # (less each prefill)
        result["cprofile"] = profile_tables(prof, decode_steps, top)
        if count_ops:  # (a pass of its own: the dispatch mode slows every operator)
            counter = OpCounter(e)
            steps0 = e.num_steps
            with counter.mode():
                run_requests(e, prompts, params)
            counter.close()
            result["torch_ops"] = counter.report(e.num_steps - steps0 - len(prompts))
        if torch_profile:  # the device timeline of a few decode/verify steps, a pass of its own
            from pegboard.core.bench.torch_profile import TorchProfile

            with TorchProfile(e, os.path.join(torch_profile, name), wait=24, active=6):
                run_requests(e, prompts[:1], params)
    print_tables(name, result["cprofile"])
    return result


def _graphs(engine) -> dict:
    runner = engine.runner
    graphs = runner.cuda_graphs
    if graphs is None:
        return {"off": runner.cuda_graph_off_reason}
    out = {"replays": graphs.num_replays, "verify_replays": graphs.num_verify_replays}
    drafting = getattr(engine.speculation.speculator, "graphs", None)
    if drafting is not None:
        out["drafting_replays"] = drafting.num_replays
    return out


def parse_value(v: str):
    if v.lower() in ("true", "false"):
        return v.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(v)
    return v


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="smollm2-135m", help="a bundled config or a config.json")
    p.add_argument("--num-layers", type=int, default=None, help="override the config's layers")
    p.add_argument("--k", type=int, default=4, help="draft chain length")
    p.add_argument("--num-seqs", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--variants", default="plain,eagle")
    p.add_argument("--keep-backoff", action="store_true",
                   help="leave BACKOFF_AFTER_MISSES as it is (requests stop drafting a while)")  # fmt: skip
    p.add_argument(
        "--stub-drafting-graphs",
        action="store_true",
        help="CPU: drafting graphs whose replays do nothing (their host side only)",
    )
    p.add_argument("--thread-clock", action="store_true", help="phases on the thread's CPU clock")
    p.add_argument(
        "--count-ops",
        action="store_true",
        help="one more pass counting the torch operators called per step, by phase",
    )
    p.add_argument(
        "--torch-profile",
        default=None,
        metavar="DIR",
        help="one more pass under the torch profiler: DIR/<variant>/kernels.txt and trace.json",
    )
    p.add_argument("--json", default=None)
    p.add_argument("settings", nargs="*", help="engine settings as key=value")
    args = p.parse_args()
    model = random_weights_model_dir(args.config)
    cfg = json.loads((model / "config.json").read_text())
    if args.num_layers:
        cfg["num_hidden_layers"] = args.num_layers
        (model / "config.json").write_text(json.dumps(cfg))
    head = random_eagle3_head(Path(tempfile.mkdtemp(prefix="pegboard-eagle3-")), cfg)
    if args.stub_drafting_graphs:
        stub_drafting_graphs()
    default_backoff = spec_step.BACKOFF_AFTER_MISSES
    if not args.keep_backoff:
        spec_step.BACKOFF_AFTER_MISSES = 1 << 30  # every decode step verifies
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, cfg["vocab_size"]) for _ in range(args.input_len)]
               for _ in range(args.num_seqs)]  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    base = {"load_format": "dummy", "cuda_graph_max_bs": 1, "max_running_requests": 1}
    base |= {k: parse_value(v) for k, v in (s.split("=", 1) for s in args.settings)}
    eagle = {
        "speculator": "eagle",
        "plugin_options": {"eagle": {"model_path": str(head), "num_draft_tokens": args.k}},
        "speculative_min_speedup": 0.0,
        "speculative_min_accept_rate": 0.0,
    }
    host_drafts = {"eagle": eagle["plugin_options"]["eagle"] | {"device_drafts": False}}
    variants = {
        "plain": base,
        "eagle": base | eagle,  # chains handed to the core on the device (the default)
        "eagle-host": base | eagle | {"plugin_options": host_drafts},  # read in `propose`
        # every step switched off by the batch rule: what an off step costs next to plain
        "eagle-off": base | eagle | {"speculative_disable_by_batch_size": 1},
        # the switch's rules and the back-off as by default: off steps, probes, catch-ups
        "eagle-switch": base | {k: v for k, v in eagle.items() if "min_" not in k},
    }
    result = {"config": args.config, "layers": cfg["num_hidden_layers"], "k": args.k,
              "num_seqs": args.num_seqs, "max_tokens": args.max_tokens}  # fmt: skip
    failed = []
    for name in args.variants.split(","):
        clock = time.thread_time if args.thread_clock else time.perf_counter
        spec_step.BACKOFF_AFTER_MISSES = (
            default_backoff if name == "eagle-switch" or args.keep_backoff else 1 << 30
        )
        try:  # (one device call: a failing variant must not cost the other's figures)
            result[name] = run_variant(name, str(model), variants[name], prompts, params,
                                       args.top, clock, args.count_ops,
                                       args.torch_profile)  # fmt: skip
        except Exception:
            traceback.print_exc()
            failed.append(name)
    if "plain" in result and "eagle" in result:
        plain, spec = result["plain"], result["eagle"]
        result["verify_step_cost_vs_plain"] = round(spec["ms_per_step"] / plain["ms_per_step"], 3)
    summary = {k: v for k, v in result.items() if k not in variants}
    if failed:
        summary["failed"] = failed
    for name in variants:
        if name in result:
            r = result[name]
            summary[name] = {k: r[k] for k in ("tok_s", "steps", "ms_per_step", "speculation",
                                               "cuda_graphs")}  # fmt: skip
            h = r["host_profile"]
            summary[name]["host_ms_by_kind"] = h["host_ms_by_kind"]
            summary[name]["device_wait_ms_per_step"] = h["device_wait_ms_per_step"]
            if verify_step_ms(h):
                summary[name]["verify_step_ms"] = verify_step_ms(h)
            summary[name]["ms_per_step_by_phase"] = dict(list(h["ms_per_step"].items())[:24])
            if "torch_ops" in r:
                summary[name]["torch_ops_per_step_by_phase"] = r["torch_ops"][
                    "ops_per_step_by_phase"
                ]
    print("\n" + json.dumps(summary, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
