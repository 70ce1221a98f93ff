"""The conformance kit of the `speculator` slot (see `pegboard.sdk.testing` for the others).

    from pegboard.sdk.testing_speculator import check_speculator

    def test_my_speculator_conforms():
        check_speculator(MySpeculator)

`check_speculator` creates the plugin as the engine does (options validated, `setup`,
registered with a `PluginManager`, `propose` called through pluggy) and drives it with seeded
random requests: repetitive and random contexts, limits from 0 up, contexts that grow by
several tokens between calls (accepted drafts) or are cut back (a stop string), requests that
finish. It raises `ConformanceError` quoting the broken sentence of `pegboard.sdk.Speculator`
or the `propose` hookspec.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from pegboard.core.plugin_manager import PluginManager
from pegboard.core.speculative.step import DraftViolation, check_drafts
from pegboard.sdk.slots import SLOTS, Plugin, PluginContext
from pegboard.sdk.types import Drafts, ModelInfo, Request, RequestStatus, SamplingParams

__all__ = ["check_speculator"]


def _error(rule: str, detail: str = "") -> AssertionError:
    from pegboard.sdk.testing import ConformanceError

    return ConformanceError(f"{rule}" + (f"\n  case: {detail}" if detail else ""))


def _context(rng: random.Random, vocab: int) -> list[int]:
    if rng.random() < 0.5:  # a phrase repeated: lookup-style speculators find drafts
        phrase = [rng.randrange(vocab) for _ in range(rng.randint(1, 8))]
        return (phrase * rng.randint(2, 5))[: rng.randint(2, 40)]
    return [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]


def _info(vocab: int) -> ModelInfo:
    return ModelInfo("LlamaForCausalLM", 2, 4, 2, 16, 64, vocab, 512, torch.float32,
                     torch.device("cpu"))  # fmt: skip


def check_speculator(
    cls: type[Plugin],
    options: dict[str, Any] | None = None,
    vocab_size: int = 512,
    seed: int = 0,
    rounds: int = 40,
) -> None:
    """Check a speculator against the `propose` hookspec and the `Speculator` contract.
    `vocab_size` is the target's vocabulary (a draft model's must match it)."""
    if cls.slot != "speculator":
        raise _error(
            f"the plugin must fill slot 'speculator' (subclass {SLOTS['speculator'].base.__name__})",
            f"{cls.__qualname__}.slot == {cls.slot!r}",
        )
    manager = PluginManager(entry_points=False)
    info = manager.add(cls, name=cls.name or cls.__name__.lower())
    plugin = manager.create("speculator", info.name, options)
    ctx = PluginContext(
        _info(vocab_size), torch.device("cpu"), {"page_size": 4, "max_model_len": 512}
    )
    plugin.setup(ctx)
    manager.register(plugin)
    rng = random.Random(seed)
    live: list[Request] = []
    try:
        for round_ in range(rounds):
            while len(live) < 4:
                params = SamplingParams(temperature=rng.choice([0.0, 0.8]), max_tokens=64)
                live.append(Request(_context(rng, vocab_size), params))
            requests = rng.sample(live, rng.randint(1, len(live)))
            limits = [rng.choice([0, 1, 2, 4, 7]) for _ in requests]
            before = [list(r.token_ids) for r in requests]
            case = f"round {round_}: contexts {[len(t) for t in before]}, max_tokens {limits}"
            try:
                out = manager.hook.propose(requests=requests, max_tokens=limits)
            except Exception as e:
                raise _error("propose returns drafts (it must not raise)", f"{case}: {e!r}") from e
            _check(out, requests, limits, vocab_size, case)
            _check_chain_length(plugin, out, case)
            _check_tree_size(plugin, out, case)
            if any(list(r.token_ids) != b for r, b in zip(requests, before)):
                raise _error("propose only reads requests (token_ids unchanged)", case)
            for r, d in zip(requests, out):  # the target keeps some drafts and one token
                keep = d.host_tokens()[: rng.randint(0, len(d.tokens))]
                for t in keep + [rng.randrange(vocab_size)]:
                    r.append_token(t)
                if rng.random() < 0.1 and r.num_output_tokens > 2:  # a stop string cut it back
                    del r.token_ids[-2:], r.output_token_ids[-2:]
                if rng.random() < 0.15:
                    r.status = RequestStatus.FINISHED
            live = [r for r in live if not r.finished]
    finally:
        manager.unregister(plugin)
        plugin.close()


def _check_chain_length(plugin, out, case: str) -> None:
    """`chain_length()` is None or the most tokens any chain of this speculator has (the core
    captures verify graphs for that many; a longer chain would run eagerly)."""
    k = plugin.chain_length()
    if k is not None and (not isinstance(k, int) or k < 1):
        raise _error("chain_length() is None or a positive int", f"{case}: {k!r}")
    longest = max((len(d.tokens) for d in out if d.parents is None), default=0)
    if k is not None and longest > k:
        raise _error(
            "no chain is longer than chain_length()", f"{case}: a chain of {longest} > {k}"
        )


def _check_tree_size(plugin, out, case: str) -> None:
    """`tree_size()` is None or the most tokens any tree of this speculator has (the core
    captures tree verify graphs for that many; a larger tree would run eagerly)."""
    k = plugin.tree_size()
    if k is not None and (not isinstance(k, int) or k < 1):
        raise _error("tree_size() is None or a positive int", f"{case}: {k!r}")
    largest = max((len(d.tokens) for d in out if d.parents is not None), default=0)
    if k is not None and largest > k:
        raise _error("no tree is larger than tree_size()", f"{case}: a tree of {largest} > {k}")


def _check(out, requests: list[Request], limits: list[int], vocab: int, case: str) -> None:
    if not isinstance(out, list) or len(out) != len(requests):
        raise _error("propose returns one Drafts per request, in order", f"{case}: got {out!r}")
    for i, (d, limit) in enumerate(zip(out, limits)):
        where = f"{case}, request {i}"
        if not isinstance(d, Drafts):
            raise _error("propose returns one Drafts per request", f"{where}: {d!r}")
        if len(d.tokens) > limit:
            raise _error("at most max_tokens[i] tokens for request i", f"{where}: {d.tokens}")
        if d.parents is not None and (
            len(d.parents) != len(d.tokens)
            or any(not isinstance(p, int) or not -1 <= p < i for i, p in enumerate(d.parents))
        ):
            raise _error(
                "a tree gives each token its parent's index p, -1 <= p < i (parents first)",
                f"{where}: tokens {d.tokens}, parents {d.parents}",
            )
        if d.device_tokens is not None:
            try:
                check_drafts([d], [requests[i]], [limit], vocab)  # the form: a chain, 1-D ...
            except DraftViolation as e:
                raise _error("device_tokens as `Drafts.on_device` makes them", str(e)) from e
        tokens = d.host_tokens()
        if any(not isinstance(t, int) or not 0 <= t < vocab for t in tokens):
            raise _error("each draft is an id of the target's vocabulary", f"{where}: {tokens}")
        if d.probs is not None and tuple(d.probs.shape) != (len(d.tokens), vocab):
            raise _error("probs is [len(tokens), vocab]", f"{where}: {tuple(d.probs.shape)}")
