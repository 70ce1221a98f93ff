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

A step without drafts (the switch keeps speculation off, or nobody drafts) is not handed out
request by request at once: its rows are copied in one piece and logged, and `distribute`
hands the logged steps out when something reads the blocks (before the speculator's `propose`),
when `LOG_STEPS` have piled up, or before the hooks are removed. A run of decode steps over
the same requests is then handed out with one copy (each request one block of its run's rows)
instead of a Python pass over the batch per step: at batch 64 the pass per step was ~0.5 ms of
a switched-off EAGLE step's host work on the development CPU (`scripts/spec_host_cpu.py
--variants plain,eagle_off`). Blocks, their order and contents are what the immediate
hand-out gave.
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
#: Steps without drafts logged before they are handed out anyway (bounds the log; a run of
#: decode steps over the same requests becomes one block per request).
LOG_STEPS = 16


class TargetHidden:
    """Forward hooks on a target model capturing the hidden states a speculator asked for."""

    def __init__(self, model, layers: list[int] | str) -> None:
        self.layers = layers
        self.captured: dict[int | str, torch.Tensor] = {}
        self.handles = []
        self._log: list[tuple[ForwardBatch, torch.Tensor]] = []  # steps not yet handed out
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
        then the accepted path of its drafts, in order); other requests keep all their rows.
        Without drafts (`kept` empty) the step is logged and handed out by `distribute`."""
        if features is None:
            return
        if kept:
            self.distribute()  # the logged steps first: blocks stay in step order
            self._hand_out(batch, kept, features)
        else:
            rows = sum(batch.query_lens_cpu)
            if rows:  # copied now: a graph's static buffer is overwritten by the next replay
                self._log.append((batch, features[:rows].detach().clone()))
                if len(self._log) >= LOG_STEPS:
                    self.distribute()
        self.captured.clear()

    def distribute(self) -> None:
        """Hand out the logged steps (`hand_out` without drafts): each run of decode steps over
        the same requests as one block per request, any other step as `hand_out` would have."""
        log, self._log = self._log, []
        i = 0
        while i < len(log):
            batch, taken = log[i]
            j = i + 1
            if batch.is_decode_only:
                while j < len(log) and _next_decode(log[j][0], batch, j - i):
                    j += 1
            if j - i > 1:  # [steps, requests, features] -> one block per request
                blocks = torch.stack([t for _, t in log[i:j]], dim=1).unbind(0)
                for r, seq_len, block in zip(batch.requests, batch.seq_lens_cpu, blocks):
                    if not r.finished:
                        _append(r, seq_len - 1, block)
            else:
                self._hand_out(batch, {}, taken)
            i = j

    def _hand_out(
        self, batch: ForwardBatch, kept: dict[int, list[int]], features: torch.Tensor
    ) -> None:
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
                _append(r, first, block)

    def remove(self) -> None:
        self.distribute()  # the blocks outlive the hooks (a swapped-in head reads them)
        for h in self.handles:
            h.remove()
        self.handles = []


def _next_decode(batch: ForwardBatch, first: ForwardBatch, steps: int) -> bool:
    """`batch` is the decode step `steps` after `first`: the same requests, each `steps`
    tokens further."""
    return (
        batch.requests == first.requests
        and batch.is_decode_only
        and batch.seq_lens_cpu == [n + steps for n in first.seq_lens_cpu]
    )


def _append(r, first: int, block: torch.Tensor) -> None:
    blocks = r.plugin_state.setdefault(FEATURES_KEY, [])
    blocks.append((first, block))
    if len(blocks) >= COMPACT_AFTER:
        _compact(blocks)


def _compact(blocks: list[tuple[int, torch.Tensor]]) -> None:
    """Merge a request's latest blocks that cover consecutive positions into one (a recompute
    after preemption starts over at an earlier position: the blocks before it stay apart)."""
    i = len(blocks) - 1
    while i > 0 and blocks[i - 1][0] + blocks[i - 1][1].shape[0] == blocks[i][0]:
        i -= 1
    if i < len(blocks) - 1:
        blocks[i:] = [(blocks[i][0], torch.cat([b for _, b in blocks[i:]]))]
