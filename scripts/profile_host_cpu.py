"""The engine's host work per step on a CPU, phase by phase, with the model taken out.

python3 scripts/profile_host_cpu.py [--config qwen3-0.6b|DIR] [--rounds 4] [--temperature 0]
                                    [--forward stub|launch|eager] [--layers N]
                                    [--workload small|nano-vllm]
                                    [--max-running-requests N] [--num-seqs 256]
                                    [--speculative-algorithm NGRAM|MISS] [--target periodic]

Builds an engine over a random-weight config (`--config`: a bundled name or a directory with a
`config.json`; the default is a 1-layer, 32-wide Qwen3 with a 2,048-token vocabulary), replaces
the model forward by zero logits, and runs 256 requests (16-64 prompt tokens, 100-400 output
tokens, EOS ignored; `--workload nano-vllm`: nano-vllm's 256 requests of 100-1024 prompt and
100-1024 output tokens) `--rounds` times under `HostProfile` with the thread's CPU clock, so the
figures are the loop's own Python work (schedule, checks, prepare, sampling calls, resolve,
detokenize, ...) and other processes' load on a shared machine does not land on them. Prints
each phase's smallest CPU ms per step over the rounds, and the steps of each kind (decode,
mixed, prefill: `forward_by_kind`). More `--num-seqs` than `--max-running-requests` admits
requests while others decode, as a server under load does: admissions are then mixed steps.
Compare trees with the same command; on a GPU use `pegboard bench offline --profile-host`
(wall clock, real forward).

`--forward stub` (default) replaces the whole `ModelRunner.forward`. `--forward launch` keeps
it and takes out only the model's arithmetic, so `forward (launch)` holds the GPU run's host
work: the Triton attention backend's `prepare` (Triton's interpreter mode, set here, lets it
run on CPU tensors; no kernel runs), the logits rows, a decode step's CUDA-graph replay
bookkeeping (`CUDAGraphRunner.replay` with every graph a no-op: the static-input copies and
the padding; its LM head is in the graph), a mixed step's (`MixedGraphRunner.replay`: the
same with the padded `prepare_mixed`) and an eager step's `compute_logits` (zeros); its parts
are also reported on their own
(`forward: ...`). What it cannot show: the CUDA driver's share (pinned-memory copies, kernel
and graph launches). Another tree's engine: `PYTHONPATH=DIR` where `DIR/pegboard` is that
checkout (`git archive REV | tar -x -C DIR/pegboard`); the script itself runs from this one.

`--forward eager` keeps the model but not attention (each layer's attention call returns
zeros; the default config is 32 wide, so the arithmetic is negligible and the forward's time
is the Python that launches each layer's other ops; `--layers 28` gives it Qwen3-0.6B's
depth): `forward_by_kind` then shows an eager step's launch work per step kind, what a CUDA
graph replaces (decode steps on a GPU, mixed steps with `pegboard.core.cuda_graph_mixed`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from pegboard.core.bench import host_profile
from pegboard.core.bench.host_profile import HostProfile
from pegboard.core.bench.models import random_weights_model_dir
from pegboard.core.bench.offline import OfflineWorkload
from pegboard.core.cuda_graph import CUDAGraphRunner, capture_sizes
from pegboard.core.cuda_graph_mixed import (
    MixedGraphRunner,
    mixed_graph_max_tokens,
    mixed_token_sizes,
)
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative.step import tree_verify_lens, verify_lens
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts

TINY = {
    "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 32,
    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
    "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 2048, "rms_norm_eps": 1e-6,
    "max_position_embeddings": 4096, "rope_theta": 1000000, "tie_word_embeddings": True,
    "torch_dtype": "float32", "eos_token_id": 2, "bos_token_id": 1,
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=None, help="bundled config name or directory")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--forward", choices=("stub", "launch", "eager"), default="stub")
    p.add_argument("--layers", type=int, default=1, help="the default config's layers")
    p.add_argument("--workload", choices=("small", "nano-vllm"), default="small")
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument(
        "--speculative-algorithm",
        type=str.upper,
        choices=["NGRAM", "MISS"],
        help="speculate: NGRAM (with --target periodic the drafts are all accepted once the "
        "output has repeated) or MISS (drafts no target accepts, both switch rules off: "
        "`spec-batch64`'s --oracle miss without the switch; requests back off as there)",
    )
    p.add_argument("--speculative-num-steps", type=int, default=4)
    p.add_argument("--speculative-eagle-topk", type=int, default=1)
    p.add_argument("--disable-overlap", action="store_true")
    p.add_argument(
        "--target",
        choices=("zeros", "periodic"),
        default="zeros",
        help="the stub's logits: zeros (every token 0) or periodic (the token at position p "
        f"is {PERIOD_BASE} + p % {PERIOD}: n-gram drafts are accepted once the output repeats)",
    )
    args = p.parse_args()
    if args.config:
        model = random_weights_model_dir(args.config)
    else:
        model = Path(tempfile.mkdtemp(prefix="pegboard-tiny-"))
        (model / "config.json").write_text(json.dumps(TINY | {"num_hidden_layers": args.layers}))
    launch = args.forward == "launch"
    if launch:
        os.environ["TRITON_INTERPRET"] = "1"  # the Triton backend's host side on CPU tensors
    settings = {"attention": "triton"} if launch else {}
    if args.max_running_requests:
        settings["max_running_requests"] = args.max_running_requests
    if args.disable_overlap:
        settings["disable_overlap"] = True
    plugins = None
    if args.speculative_algorithm == "NGRAM":
        options = {"num_draft_tokens": args.speculative_num_steps}
        if args.speculative_eagle_topk > 1:
            k = args.speculative_eagle_topk
            options |= {"topk": k, "num_steps": args.speculative_num_steps}
            options["num_draft_tokens"] = args.speculative_num_steps * k
        settings |= {"speculator": "ngram", "plugin_options": {"ngram": options}}
    elif args.speculative_algorithm == "MISS":
        plugins = PluginManager()
        plugins.add(MissDrafts)
        MissDrafts.num_draft_tokens = args.speculative_num_steps
        off = {"speculative_min_accept_rate": 0.0, "speculative_min_speedup": 0.0}
        settings |= {"speculator": "miss", **off}
    llm = LLM(str(model), load_format="dummy", device="cpu", plugins=plugins, **settings)
    vocab = llm.engine.info.vocab_size
    MissDrafts.token = vocab - 1  # neither stub target's token
    runner = llm.engine.runner

    def forward(batch):  # the model's work is not host work: zero logits, right shape
        rows = batch.logits_rows.shape[0] if batch.logits_rows is not None else sum(batch.samples)
        return torch.zeros(rows, vocab)

    if launch:
        stub_model_arithmetic(runner, llm.engine.config, llm.engine.speculation.speculator)
    elif args.forward == "stub":
        runner.forward = forward
    else:  # eager: the attention kernels' work is not the model's launch
        runner.attention.forward = lambda layer, q, k, v: torch.zeros_like(q)
    if args.target == "periodic":
        periodic_target(runner, vocab)
    sizes = {"min_input": 16, "max_input": 64, "min_output": 100, "max_output": 400}
    workload = OfflineWorkload(
        num_seqs=args.num_seqs, max_token_id=min(2000, vocab - 1), temperature=args.temperature,
        **(sizes if args.workload == "small" else {}),
    )  # fmt: skip
    prompts, params = workload.build()
    llm.generate([prompts[0][:16]], params[0])  # warm-up
    reports = []
    for _ in range(args.rounds):
        with thread_clock_profile(llm.engine) as profile:
            if launch and not hasattr(profile, "_wrap_forward_parts"):  # an older tree's
                profile._wrap(runner.attention, "prepare", "forward: attention.prepare")
                profile._wrap(runner.cuda_graphs, "replay", "forward: graph replay")
                profile._wrap(runner.model, "compute_logits", "forward: compute_logits")
            with count_uploads(llm.engine, profile) as uploads:
                llm.generate(prompts, params)
        reports.append(profile.report())
    phases = reports[0]["ms_per_step"]
    best = {k: round(min(r["ms_per_step"].get(k, 0.0) for r in reports), 3) for k in phases}
    result = {"steps": reports[0]["steps"], "cpu_ms_per_step": best}
    spec = llm.engine.speculation
    if spec.speculator is not None:
        result["speculation"] = spec.stats()
    result["uploads_per_step_by_kind"] = uploads
    result["forward_by_kind"] = reports[-1].get("forward_by_kind")
    result["host_ms_by_kind"] = reports[-1].get("host_ms_by_kind")  # (an older tree: None)
    if launch:
        result["decode_step_256_cpu_us"] = time_decode_step(llm, prompts, params)
    print(json.dumps(result, indent=1))
    llm.close()


@contextlib.contextmanager
def count_uploads(engine, profile):
    """Count the host-to-device copies each step makes, by its kind (`HostProfile`'s): calls of
    `pegboard.sdk.device.to_device` (wherever a module imported it) and of the Triton backend's
    `_upload`. Each is a pinned copy on a GPU (a `pin_memory` and a `cudaMemcpyAsync`): host
    work a CPU run shows only in part. Yields {kind: uploads per step}, filled on exit."""
    from pegboard.sdk import device

    count, by_kind, patched, real = [0], {}, [], device.to_device

    def counted(fn):
        def wrapper(*args, **kwargs):
            count[0] += 1
            return fn(*args, **kwargs)

        return wrapper

    for module in list(sys.modules.values()):
        name = getattr(module, "__name__", "")
        if not name.startswith("pegboard."):
            continue
        for attr in ("to_device", "_upload"):
            fn = getattr(module, attr, None)
            if fn is real or (attr == "_upload" and name.endswith("attention_triton")):
                patched.append((module, attr, fn))
                setattr(module, attr, counted(fn))
    step = engine.step

    def step_counted(*args, **kwargs):
        count[0] = 0
        try:
            return step(*args, **kwargs)
        finally:
            kind = by_kind.setdefault(profile._step_kind, [0, 0])
            kind[0] += 1
            kind[1] += count[0]

    engine.step = step_counted
    result: dict[str, float] = {}
    try:
        yield result
    finally:
        engine.step = step
        for module, attr, fn in patched:
            setattr(module, attr, fn)
        result.update({k: round(n / steps, 2) for k, (steps, n) in sorted(by_kind.items())})


class MissDrafts(Speculator):
    """`--speculative-algorithm MISS`: drafts `num_draft_tokens` copies of a token no stub
    target samples (the vocabulary's last), so every draft is rejected."""

    name = "miss"
    num_draft_tokens = 4
    token = 0

    def chain_length(self) -> int:
        return self.num_draft_tokens  # verify steps of k + 1 rows replay the verify graphs

    def propose(self, requests, max_tokens):
        return [Drafts([self.token] * min(k, self.num_draft_tokens)) for k in max_tokens]


PERIOD, PERIOD_BASE = 16, 3


def periodic_target(runner, vocab: int) -> None:
    """Make the (stubbed) target's greedy token at position `p` be `PERIOD_BASE + p % PERIOD`
    whatever the context: after one period every n-gram draft is right, so a speculative run
    verifies full chains (the model's work stays out: one row gather of a one-hot table)."""
    forward = runner.forward
    table = torch.zeros(PERIOD, vocab)
    table[torch.arange(PERIOD), PERIOD_BASE + torch.arange(PERIOD)] = 1.0

    def periodic(batch):
        forward(batch)  # the launch's own host work (its logits are replaced)
        if batch.logits_rows is not None:
            rows = batch.logits_rows
        elif all(batch.samples):
            rows = batch.logits_indices
        else:
            rows = batch.logits_indices[[i for i, s in enumerate(batch.samples) if s]]
        return table[(batch.positions[rows] + 1) % PERIOD]

    runner.forward = periodic


def time_decode_step(llm, prompts, params, calls: int = 300) -> dict[str, float]:
    """The first decode-only step of all 256 requests, timed call by call inside the live engine
    (thread CPU µs per call, the median and the best of `calls` repeats of each part; every
    part is idempotent for the same batch): `prepare`, the whole `forward`, and the forward's
    parts (`attention.prepare`, graph `can_run` + `replay`, the logits rows and LM head)."""
    runner = llm.engine.runner
    prepare, forward, out = runner.prepare, runner.forward, {}

    def timed(name, fn, *args):
        runs = []
        for _ in range(calls):
            start = time.thread_time()
            fn(*args)
            runs.append(time.thread_time() - start)
        runs.sort()
        out[name] = {
            "median": round(runs[len(runs) // 2] * 1e6, 1),
            "best": round(runs[0] * 1e6, 1),
        }

    def probe(requests, num_tokens, page_size, pending=None):
        batch = prepare(requests, num_tokens, page_size, pending)
        if not out and len(requests) == 256 and batch.is_decode_only:
            timed("prepare", prepare, requests, num_tokens, page_size, pending)
            batch = prepare(requests, num_tokens, page_size, pending)
            timed("forward", forward, batch)
            timed("forward: attention.prepare", runner.attention.prepare, batch)
            graphs = runner.cuda_graphs
            timed(
                "forward: graph can_run + replay",
                lambda b: graphs.can_run(b) and graphs.replay(b),
                batch,
            )
            hidden = graphs.replay(batch)
            timed(
                "forward: rows + compute_logits",
                lambda: runner.model.compute_logits(hidden[batch.logits_indices]),
            )
        return batch

    runner.prepare = probe
    try:
        llm.generate(prompts, params)
    finally:
        del runner.prepare
    return out


def thread_clock_profile(engine) -> HostProfile:
    """`HostProfile` on the thread's CPU clock (a tree from before its `clock` argument: its
    module's `time.perf_counter` made the thread clock)."""
    try:
        return HostProfile(engine, clock=time.thread_time)
    except TypeError:
        host_profile.time = types.SimpleNamespace(perf_counter=time.thread_time)
        return HostProfile(engine)


class _NoGraph:
    def replay(self) -> None:  # the model's arithmetic: not host work
        pass


def stub_model_arithmetic(runner, config, speculator=None) -> None:
    """Keep `runner.forward` but give it a model that computes nothing (zeros of the right
    shapes) and the decode-graph runner a GPU run has: the real `CUDAGraphRunner` bookkeeping
    over static CPU tensors, its graphs no-ops, the backend's metadata fixed as for capture
    (with a speculator, its verify graphs too: chain or tree, as `set_speculation` asks)."""
    model, info = runner.model, runner.info
    hidden_size = info.hidden_size

    def model_forward(input_ids, positions, attention):
        return torch.zeros(input_ids.shape[0], hidden_size)

    model.forward = model_forward  # eager steps (prefill, mixed): the backend's prepare only
    max_bs = min(config.cuda_graph_max_bs, max(config.max_running_requests, 1))
    sizes = capture_sizes(max_bs)
    chain = tuple(verify_lens(speculator)) if speculator is not None else ()
    tree = tuple(tree_verify_lens(speculator)) if speculator is not None else ()
    # no per-step memset; a verify step's rows are up to `1 + k` per request
    most = max(config.max_running_requests, sizes[-1]) * max((1, *chain, *tree))
    logits = torch.zeros(most, info.vocab_size)
    model.compute_logits = lambda hidden: logits[: hidden.shape[0]]
    graphs = CUDAGraphRunner.__new__(CUDAGraphRunner)  # no capture: nothing runs on a device
    graphs.model, graphs.attention, graphs.sizes = model, runner.attention, sizes
    graphs.max_batch_size, graphs.num_replays = sizes[-1], 0
    graphs.max_model_len = info.max_model_len
    graphs.query_lens, graphs.tree_query_lens = chain, tree
    rows = sizes[-1] * max((1, *chain, *tree))
    graphs.input_ids = torch.zeros(rows, dtype=torch.int64)
    graphs.positions = torch.zeros(rows, dtype=torch.int64)
    graphs.slot_mapping = torch.full((rows,), -1, dtype=torch.int64)
    graphs.hidden = torch.zeros(rows, hidden_size)
    graphs.logits_max_size = sizes[-1]  # the LM head in the decode graphs (an older tree: unread)
    graphs.logits_buffer = torch.zeros(sizes[-1], info.vocab_size)
    graphs.graphs = {size: _NoGraph() for size in sizes}
    graphs.verify_graphs = {(size, q): _NoGraph() for size in sizes for q in chain}
    graphs.tree_graphs = {(size, q): _NoGraph() for size in sizes for q in tree}
    capacity = max(config.max_running_requests, sizes[-1])
    if tree:
        longest = max(chain + tree)
        runner.attention.prepare_for_capture(capacity, max_query_len=longest, max_tree=tree[-1] - 1)
    elif chain:
        runner.attention.prepare_for_capture(capacity, max_query_len=chain[-1])
    else:
        runner.attention.prepare_for_capture(capacity)
    runner.cuda_graphs = graphs
    mixed_tokens = mixed_graph_max_tokens(config)
    if mixed_tokens:  # mixed steps' replay bookkeeping: static rows, the padded prepare
        runner.mixed_graphs = MixedGraphRunner(
            model,
            runner.attention,
            mixed_token_sizes(mixed_tokens),
            max(config.max_running_requests, sizes[-1]),
            runner.device,
            capture=False,
        )
        runner.mixed_graphs.graphs = {size: _NoGraph() for size in runner.mixed_graphs.sizes}
        runner.mixed_graphs.hidden = torch.zeros(mixed_tokens, hidden_size)


if __name__ == "__main__":
    main()
