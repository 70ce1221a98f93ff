"""The resumable state of `pegboard spec train-eagle3`, small enough to leave a lent machine.

A GPU call's files come back only through its `$OUT` (at most 8 files of 16 MiB, 64 MiB in
all) and the next call, possibly on a fresh machine, gets only what it carries (64 MiB with
the working tree). So the state is the head's *trainable* parameters alone, float32, in
`state-NN.safetensors` shards of at most `shard_mb` MiB each, plus `state.json` (step,
training seconds, the data round's prompt offset, the shards' names). The embedding and the
LM head are the target's (frozen, rebuilt from the target on resume), so SmolLM2-135M's
head state is fc (3·576→576) + one decoder layer + norms: 5.09 M parameters, 20.4 MB in two
shards.

The optimizer state (`optimizer.pt`, AdamW's two moments: twice the parameters) is written
beside it but is not part of what has to travel: with betas (0.9, 0.95) Adam's moments
forget in ~20 steps, so a resume without it (a fresh machine) starts a new AdamW and warms
the learning rate up again over `--warmup-steps` (`train_eagle3.learning_rate`'s `warm_from`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

STATE = "state.json"
OPTIMIZER = "optimizer.pt"


def trainable(head) -> dict[str, torch.Tensor]:
    """The head's parameters that training updates (what the state holds), by module name."""
    return {name: p for name, p in head.named_parameters() if p.requires_grad}


def save_state(head, opt, out: Path, meta: dict, shard_mb: float = 12.0) -> list[str]:
    """Write the trainable parameters (float32) in shards of at most `shard_mb` MiB (a larger
    single tensor gets a shard of its own), `optimizer.pt`, then `state.json` (`meta` plus
    the shards' names). Every shard records the step, so a state written only in part (a
    killed call) is refused on load rather than mixed. Returns the shard names."""
    from safetensors.torch import save_file

    limit = int(shard_mb * 2**20)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, p in trainable(head).items():
        t = p.detach().float().cpu().contiguous()
        nbytes = t.numel() * 4
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    step = str(meta["step"])
    names = [f"state-{i:02d}.safetensors" for i in range(len(shards))]
    for name, tensors in zip(names, shards):
        save_file(tensors, str(out / (name + ".tmp")), metadata={"step": step})
        (out / (name + ".tmp")).replace(out / name)
    for stale in out.glob("state-*.safetensors"):
        if stale.name not in names:
            stale.unlink()
    if opt is not None:
        torch.save({"step": meta["step"], "opt": opt.state_dict()}, out / (OPTIMIZER + ".tmp"))
        (out / (OPTIMIZER + ".tmp")).replace(out / OPTIMIZER)
    (out / (STATE + ".tmp")).write_text(json.dumps({**meta, "shards": names}, indent=1))
    (out / (STATE + ".tmp")).replace(out / STATE)
    return names


def read_state(out: Path) -> dict:
    """`state.json`'s contents, `{}` where there is none."""
    path = out / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def load_state(head, opt, out: Path) -> dict:
    """Load the state into `head` (and `opt` where `optimizer.pt` is of the same step);
    returns `state.json` plus `optimizer_resumed`. Clear errors for a missing or mismatched
    shard, a parameter the state lacks or has in another shape."""
    from safetensors import safe_open

    meta = read_state(out)
    if not meta:
        raise FileNotFoundError(f"no {STATE} in {out}")
    params = trainable(head)
    seen = set()
    for name in meta["shards"]:
        path = out / name
        if not path.exists():
            raise FileNotFoundError(f"{out / STATE} names {name}, which is not there")
        with safe_open(str(path), "pt") as f:
            step = (f.metadata() or {}).get("step")
            if step != str(meta["step"]):
                raise ValueError(f"{path} is of step {step}, {STATE} of step {meta['step']}")
            for key in f.keys():
                if key not in params:
                    raise ValueError(f"{path} holds {key!r}, not a trainable parameter here")
                t = f.get_tensor(key)
                if t.shape != params[key].shape:
                    raise ValueError(f"{path}: {key} is {tuple(t.shape)}, "
                                     f"expected {tuple(params[key].shape)}")  # fmt: skip
                params[key].data.copy_(t)
                seen.add(key)
    missing = sorted(set(params) - seen)
    if missing:
        raise ValueError(f"the state in {out} lacks {missing}")
    resumed = False
    path = out / OPTIMIZER
    if opt is not None and path.exists():
        saved = torch.load(path, map_location=next(iter(params.values())).device)
        if saved.get("step") == meta["step"]:
            opt.load_state_dict(saved["opt"])
            resumed = True
    return {**meta, "optimizer_resumed": resumed}
