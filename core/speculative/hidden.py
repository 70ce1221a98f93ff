"""Target hidden states for speculators that read them (EAGLE): captured with forward hooks
on the target's layers (no change to the model code), handed to each request after its step.

A speculator that wants them sets `target_layers` (a list of layer indices: the residual
stream entering each of those layers, `num_layers` meaning after the last layer, as SGLang's
EAGLE-3 `layers_to_capture`), or `"final"` (the normed output, EAGLE-1/2). After every target
forward, each request's rows that the target kept (all computed tokens; for a drafting request
its last token and the accepted drafts) are appended to `request.plugin_state[FEATURES_KEY]`
as `(first position, tensor [rows, features])`; the speculator consumes and clears them.

The model runner calls `features` after every forward (`ModelRunner.set_speculation`); CUDA
graphs run it inside their captures and copy its result to a static buffer, since a replay
runs no hooks.
"""

from __future__ import annotations

import torch
from pegboard.sdk.device import to_device
from pegboard.sdk.types import ForwardBatch

FEATURES_KEY = "target_hidden"
#: A request's blocks are views into one step's gathered rows (one copy for the whole batch);
#: a request that does not draft for this many steps gets its blocks copied into one, so it
#: does not keep every step's whole batch alive.
COMPACT_AFTER = 8


class TargetHidden:
    """Forward hooks on a target model capturing the hidden states a speculator asked for."""

    def __init__(self, model, layers: list[int] | str) -> None:
        self.layers = layers
        self.captured: dict[int | str, torch.Tensor] = {}
        self.handles = []
        body = model.model
        if layers == "final":
            self.handles.append(body.norm.register_forward_hook(self._final))
            return
        for i in sorted(set(layers)):
            module = body.layers[i] if i < len(body.layers) else body.norm
            offset = (
                1 if i < len(body.layers) else 0
            )  # a layer's args: (positions, hidden, residual, attn)
            self.handles.append(module.register_forward_pre_hook(self._pre(i, offset)))

    def _pre(self, i: int, offset: int):
        def hook(module, args):
            hidden, residual = args[offset], args[offset + 1]
            self.captured[i] = hidden if residual is None else hidden + residual

        return hook

    def _final(self, module, args, output):
        self.captured["final"] = output[0] if isinstance(output, tuple) else output

    def features(self) -> torch.Tensor | None:
        """`[tokens of the last forward, features]`: the captured states, concatenated."""
        if self.layers == "final":
            return self.captured.get("final")
        if any(i not in self.captured for i in self.layers):
            return None
        return torch.cat([self.captured[i] for i in self.layers], dim=-1)

    def hand_out(
        self, batch: ForwardBatch, kept: dict[int, list[int]], features: torch.Tensor | None
    ) -> None:
        """Append each request's kept rows of `features` (`features()` of `batch`'s forward,
        kept by the model runner, replayed CUDA graphs included; see the module docstring) to
        its plugin state: `kept[id(request)]` lists a drafting request's rows (its last token,
        then the accepted path of its drafts, in order); other requests keep all their rows."""
        if features is None:
            return
        index, owners, end = [], [], 0  # every kept row, gathered in one copy
        for r, q, seq_len in zip(batch.requests, batch.query_lens_cpu, batch.seq_lens_cpu):
            start, end = end, end + q
            if r.finished:
                continue
            rows = kept.get(id(r))
            index.extend(range(start, end) if rows is None else (start + i for i in rows))
            owners.append((r, seq_len - q, q if rows is None else len(rows)))
        if owners:
            features = features.detach()
            if index == list(range(index[0], index[0] + len(index))):  # one run: no upload
                taken = features[index[0] : index[-1] + 1].clone()
            else:
                taken = features[to_device(index, features.device, torch.int64)]
            parts = [taken] if len(owners) == 1 else taken.split([n for _, _, n in owners])
            for (r, first, _), block in zip(owners, parts):
                blocks = r.plugin_state.setdefault(FEATURES_KEY, [])
                blocks.append((first, block))
                if len(blocks) >= COMPACT_AFTER:
                    _compact(blocks)
        self.captured.clear()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _compact(blocks: list[tuple[int, torch.Tensor]]) -> None:
    """Merge a request's latest blocks that cover consecutive positions into one (a recompute
    after preemption starts over at an earlier position: the blocks before it stay apart)."""
    i = len(blocks) - 1
    while i > 0 and blocks[i - 1][0] + blocks[i - 1][1].shape[0] == blocks[i][0]:
        i -= 1
    if i < len(blocks) - 1:
        blocks[i:] = [(blocks[i][0], torch.cat([b for _, b in blocks[i:]]))]
