"""Decode speed with and without speculative decoding.

Runs the same prompts (greedy, `--max-tokens` each) through one engine without speculation and
one with it, `--batch-size` prompts at a time (1: batch-1 decode), and prints JSON: output
tokens per second and engine steps of each, the speed-up, the acceptance rate and length, the
cost of a speculative step relative to a plain one, the CUDA graph replays (decode and verify)
and how far each completion agrees with the plain run: `identical_completions`, `first_diff`
(per completion, the first differing token's index) and `identical_leading_share` (bf16
near-ties flip late; `--dtype float32` tells them from a bug, which differs early in float32
too).
`--compare-eager` adds the same speculation without CUDA graphs (`spec_eager`).
`--compare-num-steps 6,8` adds chains of those lengths with the switch disabled
(`spec_no_switch_k6`, ...: accept length against verify cost; chains only, not trees).
`--compare-off` adds the speculator switched off from the first step (`spec_off`: the batch
rule at 1, so no step drafts; its `step_cost_vs_plain` is what a switched-off step costs, with
no verify step or flip mixed in: 1.0 when an off step is a plain step) and, last, a second
plain engine (`plain_again`: the run-to-run and engine-order noise of these figures).
Each run also reports the garbage collector's runs and ms inside it (`gc`: a full collection in
a 0.5 s run moves its tok/s by tens of percent, `pegboard.core.bench.gc_time`).
`--step-times` times every step by the wall clock (its start to the next step's) and sorts it
by kind (`StepTimes`): `steady` (a plain step that overlaps, after one that overlapped: what a
switched-off step is), `verify`, `flip` (a plain step that read its tokens at once: the next
may draft), `host_fed` (a plain step after a verify or flip: the device idled while the host
prepared it), `prefill`; per run `step_ms` (steps, median, total of each kind), `probes` (the
first verify steps with the steps on either side) and `extra_ms_by_kind` (each kind's time
above that many of plain's steady steps: where a run's time over plain goes) and
`steady_vs_plain` (a steady step's mean ms over plain's: what a switched-off step costs).

    python3 scripts/bench_speculative.py --speculative-algorithm EAGLE3 \
        --speculative-draft-model-path /tmp/eagle3-smollm2 [--model DIR] [--batch-size 1]
    python3 scripts/bench_speculative.py --speculative-algorithm NGRAM --extractive
    python3 scripts/bench_speculative.py --config llama-3.1-8b --oracle perfect \
        --speculative-num-steps 4           # random weights; drafts = the plain run's tokens
    python3 scripts/bench_speculative.py --config qwen3-0.6b --oracle miss --batch-size 64 \
        --compare-switch [--compare-off]    # every draft wrong: the switch on, then off
                                            # (acceptance and speed rules both off)

Prompts are chat-formatted questions of the model's tokenizer, or with `--config NAME` (random
weights of a bundled config, no tokenizer) random token ids, repeated phrases with
`--extractive`. `--extractive` asks the model to repeat and edit a given text (n-gram lookup's
workload). `--oracle perfect` drafts what the plain run generated (a perfect draft that costs
nothing: the verify's own overhead, ideally (k + 1)x tokens per step); `--oracle miss` drafts
those tokens plus one (every draft rejected: speculation's worst case).
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import time

from pegboard.core.bench.gc_time import GcTime
from pegboard.core.default_model import default_model_dir
from pegboard.core.llm import LLM
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative.flags import add_speculative_arguments, speculative_settings
from pegboard.sdk.slots import Speculator
from pegboard.sdk.types import Drafts, SamplingParams

QUESTIONS = [
    "Explain how a refrigerator works.",
    "Write a short poem about the sea.",
    "What are three tips for learning a new language?",
    "Describe the water cycle step by step.",
    "Write a Python function that reverses a linked list, with comments.",
    "Summarise the plot of Romeo and Juliet.",
    "Why is the sky blue?",
    "Give me a recipe for pancakes.",
]
PASSAGE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! The five boxing wizards jump quickly. "
)


class Oracle(Speculator):
    """Drafts the plain run's completion of each prompt (`miss`: each token plus one)."""

    name = "oracle"
    completions: dict[tuple[int, ...], list[int]] = {}
    num_draft_tokens = 4
    offset = 0
    vocab = 32000

    def chain_length(self) -> int:
        return self.num_draft_tokens  # verify steps of k + 1 tokens replay CUDA graphs

    def propose(self, requests, max_tokens):
        out = []
        for r, k in zip(requests, max_tokens):
            ref = self.completions.get(tuple(r.prompt_token_ids), [])
            done = r.num_output_tokens
            ref = ref[done : done + min(k, self.num_draft_tokens)]
            out.append(Drafts([(t + self.offset) % self.vocab for t in ref]))
        return out


def run(llm, prompts, params, batch_size, step_times=False):
    start = time.perf_counter()
    steps = llm.engine.num_steps
    outs = []
    with GcTime() as gc_time, StepTimes(llm.engine, step_times) as timed:
        for i in range(0, len(prompts), batch_size):
            outs += llm.generate(prompts[i : i + batch_size], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    report = {"tok_s": round(tokens / elapsed, 1), "steps": llm.engine.num_steps - steps,
              "elapsed_s": round(elapsed, 3), "gc": gc_time.report()}  # fmt: skip
    if step_times:
        report |= timed.report()
    return outs, report


class StepTimes:
    """Each engine step's wall time (its start to the next step's start, the last one's to the
    end of the run) and its kind, while open (`--step-times`). A step's kind: `verify` (it
    verified drafts), `prefill` (not decode-only), `flip` (a plain decode step that read its
    tokens at once, so the next one may draft), `host_fed` (a plain decode step after a step
    that read its tokens at once: its inputs came from the host, the device idled while it was
    prepared) or `steady` (a plain decode step that overlaps, after one that overlapped: what
    an engine without speculation runs, and what a switched-off step must cost)."""

    def __init__(self, engine, on: bool = True) -> None:
        self.engine, self.on = engine, on
        self.starts: list[float] = []
        self.kinds: list[str] = []
        #: Steps of a kind other than `steady`: (step, kind, requests verified, the switch's
        #: steps left off and why, its trials so far) — which rule drafted when.
        self.trace: list[tuple] = []

    def __enter__(self) -> StepTimes:
        if not self.on:
            return self
        e = self.engine
        step, forward = e.step, e.runner.forward
        decode = [False]

        def timed_forward(batch, *args, **kwargs):
            decode[0] = batch.is_decode_only
            return forward(batch, *args, **kwargs)

        def timed_step():
            self.starts.append(time.perf_counter())
            verified, decode[0] = e.speculation.num_verify, False
            before = self.kinds[-1] if self.kinds else None
            out = step()
            if e.speculation.num_verify > verified:
                kind = "verify"
            elif not decode[0]:
                kind = "prefill"
            elif e._pending is None:
                kind = "flip"
            else:
                kind = "host_fed" if before in ("verify", "flip") else "steady"
            self.kinds.append(kind)
            if kind != "steady":
                sw = e.speculation.switch
                verified = e.speculation.num_verify - verified
                self.trace.append((len(self.kinds) - 1, kind, verified, *sw.off_for,
                                   sw.num_trials))  # fmt: skip
            return out

        e.step, e.runner.forward = timed_step, timed_forward
        return self

    def __exit__(self, *exc) -> None:
        if self.on:
            self.end = time.perf_counter()
            del self.engine.step, self.engine.runner.forward  # the class's methods again

    def times_ms(self) -> list[float]:
        ends = self.starts[1:] + [self.end]
        return [(b - a) * 1e3 for a, b in zip(self.starts, ends)]

    def report(self) -> dict:
        ms = self.times_ms()
        by_kind: dict[str, list[float]] = {}
        for kind, t in zip(self.kinds, ms):
            by_kind.setdefault(kind, []).append(t)
        probes = [[round(t, 3) for t in ms[max(i - 1, 0) : i + 2]]
                  for i, k in enumerate(self.kinds) if k == "verify"]  # fmt: skip
        return {
            "step_ms": {k: {"steps": len(v), "median": round(statistics.median(v), 3),
                            "total": round(sum(v), 2)} for k, v in sorted(by_kind.items())},
            "probes": probes[:8],  # [step before, verify step, step after] of the first 8
            "trace": self.trace[:60],
            "_times": list(zip(self.kinds, ms)),  # (`extra_ms_by_kind`; dropped from the JSON)
        }  # fmt: skip


def extra_ms_by_kind(report: dict, plain_step_ms: float) -> dict:
    """Each step kind's time above as many plain steady steps (`plain_step_ms` each): where
    the run's time over plain goes (a steady step's share is what switched-off steps cost)."""
    out: dict[str, float] = {}
    for kind, t in report.pop("_times"):
        out[kind] = out.get(kind, 0.0) + t - plain_step_ms
    return {k: round(v, 2) for k, v in sorted(out.items())}


def graph_report(runner, speculator=None) -> dict:
    """Whether CUDA graphs served the run: replays of decode, verify and tree verify graphs
    (and of an EAGLE head's drafting graphs), or why off."""
    graphs = runner.cuda_graphs
    if graphs is None:
        return {"off": runner.cuda_graph_off_reason}
    report = {"replays": graphs.num_replays, "verify_replays": graphs.num_verify_replays,
              "tree_verify_replays": graphs.num_tree_replays,
              "verify_query_lens": list(graphs.query_lens),
              "tree_query_lens": list(graphs.tree_query_lens),
              "features": graphs.features_fn is not None}  # fmt: skip
    drafting = getattr(speculator, "tree_graphs", None) or getattr(speculator, "graphs", None)
    if drafting is not None:
        report["drafting_replays"] = drafting.num_replays
    return report


def divergence(plain, spec) -> dict:
    """How far each speculative completion agrees with the plain one: `first_diff` per
    completion (the index of the first differing token, None if identical) and the mean share
    of each completion's leading tokens that agree. A bf16 near-tie flips late (and not in
    float32); a speculation bug shows early, in float32 too."""
    first, shares = [], []
    for a, b in zip(plain, spec):
        x, y = a.token_ids, b.token_ids
        n = next((i for i, (s, t) in enumerate(zip(x, y)) if s != t), min(len(x), len(y)))
        same = x == y
        first.append(None if same else n)
        shares.append(1.0 if same else n / max(len(x), len(y), 1))
    return {"identical_completions": f"{first.count(None)}/{len(first)}", "first_diff": first,
            "identical_leading_share": round(sum(shares) / max(len(shares), 1), 3)}  # fmt: skip


def prompts_for(args, llm) -> list:
    if args.config is None:
        questions = QUESTIONS * args.repeat
        if args.extractive:
            questions = [f"Repeat this text exactly, then once more with every 'quick' replaced "
                         f"by 'fast':\n\n{PASSAGE * 3}" for _ in questions]  # fmt: skip
        return [llm.tokenizer.apply_chat_template([{"role": "user", "content": q}])
                for q in questions]  # fmt: skip
    rng = random.Random(0)
    vocab = min(llm.engine.info.vocab_size, 32000)
    out = []
    for _ in range(args.num_prompts):
        if args.extractive:
            phrase = [rng.randrange(vocab) for _ in range(16)]
            out.append((phrase * (args.input_len // 16 + 1))[: args.input_len])
        else:
            out.append([rng.randrange(vocab) for _ in range(args.input_len)])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=None)
    p.add_argument(
        "--config", default=None, help="a bundled config (or its directory): random weights"
    )
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--repeat", type=int, default=1, help="prompt list repetitions")
    p.add_argument("--num-prompts", type=int, default=8, help="with --config")
    p.add_argument("--input-len", type=int, default=128, help="with --config")
    p.add_argument("--extractive", action="store_true")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default=None, help="the model's dtype (e.g. float32: no bf16 ties)")
    p.add_argument("--attention", default=None)
    p.add_argument("--kv-cache-tokens", type=int, default=None)
    p.add_argument("--cuda-graph-max-bs", type=int, default=None, help="largest captured batch")
    p.add_argument("--oracle", choices=["perfect", "miss"], default=None)
    p.add_argument("--compare-switch", action="store_true",
                   help="also run speculation with the on/off switch disabled")  # fmt: skip
    p.add_argument("--compare-eager", action="store_true",
                   help="also run speculation without CUDA graphs (spec_eager)")  # fmt: skip
    p.add_argument("--compare-off", action="store_true",
                   help="also run the speculator switched off throughout (spec_off) and a "
                   "second plain engine (plain_again)")  # fmt: skip
    p.add_argument("--compare-num-steps", default=None, metavar="K[,K...]",
                   help="also run these chain lengths with the switch disabled "
                   "(spec_no_switch_k<K>: how the draft length trades accept length for "
                   "verify cost)")  # fmt: skip
    p.add_argument("--step-times", action="store_true",
                   help="time every step by kind (step_ms, probes, extra_ms_by_kind)")  # fmt: skip
    p.add_argument("--keep-warm-up-switch", action="store_true",
                   help="start each timed run with the switch as the batch-1 warm-up left it "
                   "(by default it starts fresh: a cooldown the warm-up began, up to 4,096 "
                   "steps, would spare the timed run its first probes)")  # fmt: skip
    add_speculative_arguments(p)
    args = p.parse_args()
    if args.compare_num_steps and args.oracle:
        p.error("--compare-num-steps runs the speculator of --speculative-algorithm, not an oracle")
    base = {"device": args.device}
    if args.dtype:
        base["dtype"] = args.dtype
    if args.config:
        from pegboard.core.bench.models import random_weights_model_dir

        model = str(random_weights_model_dir(args.config))
        base["load_format"] = "dummy"
    else:
        model = args.model or str(default_model_dir())
    if args.attention:
        base["attention"] = args.attention
    if args.kv_cache_tokens:
        base["kv_cache_tokens"] = args.kv_cache_tokens
    if args.cuda_graph_max_bs is not None:
        base["cuda_graph_max_bs"] = args.cuda_graph_max_bs
    settings = dict(base)
    speculative_settings(args, settings)
    for flag in (
        "speculative_disable_by_batch_size",
        "speculative_min_accept_rate",
        "speculative_min_speedup",
    ):
        if getattr(args, flag) is not None:
            settings[flag] = getattr(args, flag)
    params = SamplingParams(
        max_tokens=args.max_tokens, temperature=0.0, ignore_eos=bool(args.config)
    )
    result = {"model": args.config or model, "batch_size": args.batch_size}
    with LLM(model, **base) as llm:
        prompts = prompts_for(args, llm)
        vocab = llm.engine.info.vocab_size
        result["prompts"] = len(prompts)
        run(llm, prompts[:1], params, 1)  # warm-up
        plain, result["plain"] = run(llm, prompts, params, args.batch_size, args.step_times)
    plain_step_ms = None
    if args.step_times:
        steady = result["plain"]["step_ms"]["steady"]
        plain_step_ms = steady["total"] / steady["steps"]  # (the mean: plain's extra is ~0)
        result["plain"]["extra_ms_by_kind"] = extra_ms_by_kind(result["plain"], plain_step_ms)
    del llm  # its weights and KV go before the next engine's are allocated
    gc.collect()
    plugins = None
    if args.oracle:
        Oracle.completions = {tuple(q): o.token_ids for q, o in zip(prompts, plain)}
        Oracle.num_draft_tokens = args.speculative_num_steps or 4
        Oracle.offset = 1 if args.oracle == "miss" else 0
        Oracle.vocab = vocab
        plugins = PluginManager()
        plugins.add(Oracle)
        settings["speculator"] = "oracle"
    variants = [("spec", settings)]
    if args.compare_switch:
        off = {"speculative_min_accept_rate": 0.0, "speculative_min_speedup": 0.0}
        variants.append(("spec_no_switch", {**settings, **off}))  # drafts every step it can
    if args.compare_eager:
        variants.append(("spec_eager", {**settings, "disable_cuda_graph": True}))
    for k in filter(None, (args.compare_num_steps or "").split(",")):
        longer = argparse.Namespace(**{**vars(args), "speculative_num_steps": int(k)})
        chain = {**base, "speculative_min_accept_rate": 0.0, "speculative_min_speedup": 0.0}
        speculative_settings(longer, chain)
        chain["speculative_min_speedup"] = 0.0
        variants.append((f"spec_no_switch_k{k}", chain))
    if args.compare_off:
        variants.append(("spec_off", {**settings, "speculative_disable_by_batch_size": 1}))
        variants.append(("plain_again", base))
    for name, s in variants:
        with LLM(model, plugins=plugins, **s) as llm:
            run(llm, prompts[:1], params, 1)
            if not args.keep_warm_up_switch:
                llm.engine.speculation.switch.reset()
            before = llm.engine.speculation.stats()
            spec, result[name] = run(llm, prompts, params, args.batch_size, args.step_times)
            report = llm.engine.speculation.report(before)
            result[name]["speculation"] = report
            result[name]["cuda_graphs"] = graph_report(
                llm.engine.runner, llm.engine.speculation.speculator
            )
        del llm
        gc.collect()
        plain_step = result["plain"]["elapsed_s"] / max(result["plain"]["steps"], 1)
        spec_step = result[name]["elapsed_s"] / max(result[name]["steps"], 1)
        result[name]["speedup"] = round(result[name]["tok_s"] / result["plain"]["tok_s"], 3)
        result[name]["step_cost_vs_plain"] = round(spec_step / plain_step, 3)
        if plain_step_ms is not None:
            steady = result[name]["step_ms"].get("steady")  # (none: every step drafted)
            result[name]["steady_vs_plain"] = steady and round(
                steady["total"] / steady["steps"] / plain_step_ms, 3
            )  # (mean ms of a steady step: a switched-off step's cost, 1.0 when it is plain)
            result[name]["extra_ms_by_kind"] = extra_ms_by_kind(result[name], plain_step_ms)
        result[name].update(divergence(plain, spec))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
