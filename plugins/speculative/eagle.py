"""`eagle`: EAGLE-1/2 and EAGLE-3 draft heads in the checkpoint formats SGLang loads.

A head is one decoder layer that drafts from the target's own hidden states:

- EAGLE-1/2 (`LlamaForCausalLMEagle`): `fc` maps `[embed(token t+1), target hidden(t)]`
  (`2 * hidden`) to `hidden`, then `layers.0` (a Llama decoder layer); the target's LM head
  turns the output into logits. Features: the target's final (normed) hidden states.
- EAGLE-3 (`LlamaForCausalLMEagle3`): `fc` maps three auxiliary hidden states of the target
  (the residual stream entering layers `eagle_aux_hidden_state_layer_ids + 1`, by default
  `2, L // 2, L - 3`) to `hidden`; `midlayer` attends over `[input_layernorm(embed),
  hidden_norm(hidden)]` (`2 * hidden` wide q/k/v inputs); `norm` and the head's own `lm_head`
  over a reduced draft vocabulary, mapped to target ids with `d2t` (`target = draft +
  d2t[draft]`). After the first step a head feeds on its own output (the pre-norm sum).

The embedding is the target's (`embed_tokens` in the head's checkpoint, if present, wins).
The head keeps its own paged KV (`head_kv.HeadKV`, a slot per request in
`request.plugin_state["eagle"]`): real entries for every target position it has seen, plus
this step's draft entries, overwritten next step. Drafting is batched across requests: one
head forward over every request's unseen (feature, token) pairs, then one per draft step (or
tree depth) for all of them, through an ordinary attention backend over the head's pool. On
CUDA a chain's whole `propose` replays as one CUDA graph (`head_graphs.DraftGraphs`), a
tree's too (`head_tree_graphs.TreeDraftGraphs`), once every request has at most `k + 1` (a
tree: `depth + 1`) new pairs.

With `topk` > 1 the head drafts a tree (EAGLE-2, `tree_search.DraftTree`): best-first by the
head's confidence, `num_steps` deep, `num_draft_tokens` nodes, the greedy chain as its first
path. Expanded nodes attend to the real entries, their ancestors and themselves.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import numpy as np
import pydantic
import torch
from pegboard.core.models.config import RopeConfig
from pegboard.core.models.layers import RMSNorm
from pegboard.core.models.rope import RotaryEmbedding
from pegboard.core.speculative.hidden import FEATURES_KEY
from pegboard.plugins.speculative.head_graphs import DraftGraphs
from pegboard.plugins.speculative.head_kv import HeadKV, HeadSlot
from pegboard.plugins.speculative.head_tree_graphs import TreeDraftGraphs
from pegboard.plugins.speculative.tree_search import DraftTree
from pegboard.sdk.device import to_device
from pegboard.sdk.slots import PluginContext, Speculator
from pegboard.sdk.types import Drafts, ModelInfo, Request
from torch import nn
from torch.nn import functional as F

log = logging.getLogger("pegboard.speculative.eagle")

STATE_KEY = "eagle"
EAGLE3 = "LlamaForCausalLMEagle3"
EAGLE = "LlamaForCausalLMEagle"


class EagleOptions(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(extra="forbid")

    model_path: str | None = pydantic.Field(None, description="the EAGLE head's directory")
    num_draft_tokens: int = pydantic.Field(4, ge=1, description="draft tokens per step at most")
    topk: int = pydantic.Field(1, ge=1, description="children per expanded tree node (1: chain)")
    num_steps: int | None = pydantic.Field(
        None, ge=1, description="a tree's depth (default: num_draft_tokens)"
    )
    kv_cache_tokens: int = pydantic.Field(
        65536, ge=16, description="tokens the head's own KV pool holds (all requests)"
    )
    attention: str = pydantic.Field(
        "auto", description="the head's attention backend: torch, triton, auto (triton on CUDA)"
    )
    device_drafts: bool = pydantic.Field(
        True,
        description="hand chain drafts to the core on the device (`Drafts.on_device`): the "
        "host never waits for the drafting forward (false: read them in `propose`)",
    )


def graphs_supported(kv: HeadKV) -> bool:
    """Whether the head's draft steps can be captured: on CUDA, with a graph-safe backend."""
    return kv.device.type == "cuda" and kv.attention.supports_cuda_graph


def read_head_config(path: str | Path) -> dict:
    file = Path(path) / "config.json"
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the EAGLE head's {file}: {e}") from e


def aux_layers(head: dict, num_target_layers: int) -> list[int]:
    """The target layers whose incoming residual stream EAGLE-3 reads (SGLang's rule)."""
    ids = (head.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
    if ids is None:
        ids = [1, num_target_layers // 2 - 1, num_target_layers - 4]
    return [i + 1 for i in ids]


class EagleSpeculator(Speculator):
    """Drafts with an EAGLE head over the target's hidden states."""

    name = "eagle"
    Options = EagleOptions
    #: The core captures the target's hidden states for it (`pegboard.core.speculative.hidden`;
    #: decode CUDA graphs are off then, their replays run no hooks).
    reads_target_hidden = True

    @classmethod
    def check_target(cls, config: dict, options: EagleOptions) -> None:
        if not options.model_path:
            raise ValueError("needs an EAGLE head: --eagle-model-path DIR "
                             "(or --speculative-draft-model-path)")  # fmt: skip
        head = read_head_config(options.model_path)
        arch = (head.get("architectures") or ["?"])[0]
        if arch not in (EAGLE, EAGLE3):
            raise ValueError(
                f"{options.model_path} is a {arch}, not an EAGLE head ({EAGLE} or {EAGLE3})"
            )
        target_hidden = head.get("target_hidden_size") or head.get("hidden_size")
        if target_hidden != config.get("hidden_size"):
            raise ValueError(
                f"the EAGLE head reads hidden states of size {target_hidden}, the target's are "
                f"{config.get('hidden_size')}: it was trained for another model"
            )
        if arch == EAGLE and head.get("hidden_size") != config.get("hidden_size"):
            raise ValueError("an EAGLE-1/2 head's hidden size must equal the target's")
        if head.get("vocab_size") != config.get("vocab_size"):
            raise ValueError(
                f"the EAGLE head's vocabulary ({head.get('vocab_size')} tokens) differs from "
                f"the target's ({config.get('vocab_size')})"
            )
        if arch == EAGLE3:
            layers = aux_layers(head, config.get("num_hidden_layers", 0))
            if any(not 0 <= i <= config.get("num_hidden_layers", 0) for i in layers):
                raise ValueError(f"auxiliary layers {layers} are outside the target's layers")

    def setup(self, ctx: PluginContext, previous=None) -> None:
        if not self.options.model_path:
            raise ValueError("the eagle speculator needs model_path")
        self.config = read_head_config(self.options.model_path)
        self.eagle3 = self.config["architectures"][0] == EAGLE3
        self.device = ctx.device
        self.dtype = ctx.model.dtype if ctx.model else torch.float32
        self.max_model_len = ctx.model.max_model_len if ctx.model else 4096
        self.engine_facts = ctx.engine
        self.graphs: DraftGraphs | None = None  # chain drafting as CUDA graphs
        self.tree_graphs: TreeDraftGraphs | None = None  # ... and tree drafting
        self.page_size = int(ctx.engine.get("page_size") or 16)
        self.head: EagleHead | None = None  # built by `bind_target`, with the target's parts
        self.kv: HeadKV | None = None  # the head's paged KV, built with the head
        self.target_layers: list[int] | str = "final"
        self._tracked: dict[int, Request] = {}  # requests holding head pages

    def bind_target(self, model) -> None:
        """Called by the core once, before the first `propose`: the target model, whose
        embedding (and for EAGLE-1/2 LM head) the head shares and whose layers it reads."""
        num_layers = len(model.model.layers)
        self.target_layers = aux_layers(self.config, num_layers) if self.eagle3 else "final"
        self.head = EagleHead(self.config, self.eagle3, model, self.options.model_path)
        self.head.to(device=self.device, dtype=self.dtype).eval()
        if getattr(model, "fused_kernels", False):  # the target's Triton norms and rope (CUDA)
            self.head.use_fused_kernels()
        h = self.head
        info = ModelInfo(
            EAGLE3 if self.eagle3 else EAGLE, 1, h.num_heads, h.num_kv_heads, h.head_dim,
            self.config["hidden_size"], self.config["vocab_size"], self.max_model_len,
            self.dtype, self.device,
        )  # fmt: skip
        self.kv = HeadKV(info, self.options.kv_cache_tokens, self.page_size, self.options.attention)
        self.graphs, self.tree_graphs = self._drafting_graphs()

    def _drafting_graphs(self) -> tuple[DraftGraphs | None, TreeDraftGraphs | None]:
        """CUDA graphs of chain or tree drafting, where the engine captures graphs (its
        `cuda_graph_max_bs`) and the head's backend supports them; none (logged) if the
        capture fails."""
        o, facts = self.options, self.engine_facts
        max_bs = min(int(facts.get("cuda_graph_max_bs") or 0),
                     int(facts.get("max_running_requests") or 0))  # fmt: skip
        depth = min(o.num_steps or o.num_draft_tokens, o.num_draft_tokens)
        if max_bs < 1 or not graphs_supported(self.kv):
            return None, None
        features = self.head.fc.in_features - (0 if self.eagle3 else self.head.hidden)
        kind = "tree" if o.topk > 1 else "chain"
        try:
            if o.topk > 1 and depth >= 2:
                return None, TreeDraftGraphs(self.head, self.kv, o.topk, depth, max_bs, features)
            if o.topk == 1 and o.num_draft_tokens >= 2:
                return DraftGraphs(self.head, self.kv, o.num_draft_tokens, max_bs, features), None
        except Exception as e:
            log.warning("EAGLE draft-%s CUDA graph capture failed, drafting eagerly: %s", kind, e)
        return None, None

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        """Drafts for every request at once: one head forward over all requests' unseen
        (feature, token) pairs, then one per draft step (a chain) or tree depth (a tree)."""
        self._release_finished()
        out = [Drafts([]) for _ in requests]
        if self.head is None:
            return out
        o = self.options
        limits = [min(k, o.num_draft_tokens) for k in max_tokens]
        kmax = max(limits, default=0)
        tree = o.topk > 1
        graphs = self.tree_graphs if tree else self.graphs
        if kmax and graphs is not None:
            kmax = o.num_draft_tokens  # the captured chain or depth (drafts cut to each limit)
        depth = min(o.num_steps or o.num_draft_tokens, kmax)
        extra = o.topk * (depth - 1) if tree else kmax - 1  # draft entries after the real ones
        jobs = [
            job
            for i, (r, k) in enumerate(zip(requests, limits))
            if k and (job := self._ingest(i, r, extra)) is not None
        ]
        if not jobs:
            return out
        if graphs is not None and len(jobs) <= graphs.max_batch_size:
            jobs = self._catch_up(jobs, graphs.q)  # leaves at most q new pairs per job
        if graphs is not None and graphs.can_run(jobs):  # catch-up and drafting: one replay
            if tree:
                drafts = graphs.run(jobs, [limits[j.index] for j in jobs])
            else:
                drafts = graphs.run(jobs)  # [len(jobs), k], the graph's output buffer
            for j in jobs:
                j.commit()
        elif tree:
            hidden = self._feed(jobs)  # [len(jobs), hidden]: predicts each first draft
            drafts = self._trees(jobs, hidden, [limits[j.index] for j in jobs])
        else:
            drafts = self._chains(jobs, self._feed(jobs), kmax)
        if tree:
            for job, d in zip(jobs, drafts):
                out[job.index] = d
            return out
        # A chain's ids stay on the device: the core verifies them without the host waiting
        # for this drafting (the graph's buffer holds them until the next `propose`).
        if not self.options.device_drafts:
            for job, d in zip(jobs, self.read_drafts(drafts)):
                out[job.index] = Drafts(d[: limits[job.index]])
            return out
        for i, job in enumerate(jobs):  # (indexing: iterating a tensor costs an `unbind`)
            out[job.index] = Drafts.on_device(drafts[i, : limits[job.index]])
        return out

    def _ingest(self, i: int, r: Request, extra: int) -> _Job | None:
        """Request `r`'s (feature at t, token t + 1) pairs the head has not seen, with head KV
        reserved for them and `extra` draft entries; None if there are none or no room."""
        slot: HeadSlot | None = r.plugin_state.get(STATE_KEY)
        if slot is None:
            slot = r.plugin_state[STATE_KEY] = HeadSlot()
            self._tracked[id(r)] = r
        tokens = r.token_ids
        pending = r.plugin_state.get(FEATURES_KEY, [])
        feats, positions, ids = [], [], []
        for start, block in pending:
            lo = max(slot.next_position - start, 0)
            hi = min(block.shape[0], len(tokens) - 1 - start)
            if hi > lo:
                feats.append(block if hi - lo == block.shape[0] else block[lo:hi])
                positions.extend(range(start + lo, start + hi))
                ids.extend(tokens[start + lo + 1 : start + hi + 1])  # (each position's next)
        if not positions or not self.kv.reserve(slot, slot.real + len(positions) + extra):
            return None
        r.plugin_state.pop(FEATURES_KEY, None)
        return _Job(i, slot, feats[0] if len(feats) == 1 else torch.cat(feats), ids, positions)

    def _feed(self, jobs: list[_Job]) -> torch.Tensor:
        """One head forward over every job's new real entries; the last row of each."""
        # (`fromiter` over the chained lists: as fast as a comprehension for a drafting step's
        # few pairs a job, ~1.5x faster for a catch-up's thousands; a numpy upload of the ids)
        n = sum(len(j.ids) for j in jobs)
        positions = np.fromiter(chain.from_iterable(j.positions for j in jobs), np.int64, n)
        ids = to_device(
            np.fromiter(chain.from_iterable(j.ids for j in jobs), np.int64, n), self.device
        )
        batch = self.kv.batch([(j.slot, j.slot.real, len(j.ids)) for j in jobs], positions, ids)
        hidden = self._step(torch.cat([j.feats for j in jobs]), ids, batch, first=True)
        ends, end = [], 0
        for j in jobs:
            end += len(j.ids)
            ends.append(end - 1)
            j.commit()
        return hidden[to_device(ends, self.device, torch.int64)]

    def _step(self, features, ids, batch, first: bool) -> torch.Tensor:
        return self.head.step(features, ids, batch.positions, self.kv.attention, first)

    def _catch_up(self, jobs: list[_Job], q: int) -> list[_Job]:
        """Feed all but the last `q` new pairs of the jobs that have more (after a prefill or
        a pause) in one eager head forward; the jobs with what is left."""
        long = [j for j in jobs if len(j.ids) > q]
        if long:
            self._feed([_Job(j.index, j.slot, j.feats[:-q], j.ids[:-q], j.positions[:-q])
                        for j in long])  # fmt: skip
        return [
            _Job(j.index, j.slot, j.feats[-q:], j.ids[-q:], j.positions[-q:])
            if len(j.ids) > q
            else j
            for j in jobs
        ]

    def _chains(self, jobs: list[_Job], last: torch.Tensor, k: int) -> torch.Tensor:
        """`k` greedy drafts per job, one batched head step per draft: `[len(jobs), k]` ids,
        on the device."""
        tokens = self.head.draft_ids(last)
        drafted = [tokens]
        for d in range(1, k):
            rows = [(j.slot, j.slot.real + d - 1, 1) for j in jobs]
            batch = self.kv.batch(rows, [j.positions[-1] + d for j in jobs], tokens)
            last = self._step(last, tokens, batch, first=False)
            tokens = self.head.draft_ids(last)
            drafted.append(tokens)
        return torch.stack(drafted, dim=1)

    @staticmethod
    def read_drafts(drafts: torch.Tensor) -> list[list[int]]:
        """A chain's drafts on the host, with `device_drafts` off: where `propose` waits for
        the device (the drafting graph or eager steps), one synchronizing call per `propose`."""
        return drafts.tolist()

    def _trees(self, jobs: list[_Job], last: torch.Tensor, limits: list[int]) -> list[Drafts]:
        """EAGLE-2 draft trees (`tree_search`) for every job: per depth one head step over
        all jobs' frontiers; expanded nodes attend to the real entries, their ancestors and
        themselves (a tree mask over the job's draft entries)."""
        o = self.options
        topk = o.topk
        depths = [min(o.num_steps or o.num_draft_tokens, k) for k in limits]
        trees = [DraftTree(topk) for _ in jobs]
        values, ids = self.head.draft_topk(last, topk)
        values, ids = values.tolist(), ids.tolist()
        frontier = [t.add_children(-1, v, i) for t, v, i in zip(trees, values, ids)]
        inputs = [last[b : b + 1].expand(topk, -1) for b in range(len(jobs))]
        fed: list[list[int]] = [[] for _ in jobs]  # expanded nodes, in head KV order
        for d in range(2, max(depths, default=0) + 1):
            live = [b for b in range(len(jobs)) if d <= depths[b] and frontier[b]]
            if not live:
                break
            rows, positions, masks, tokens = [], [], [], []
            for b in live:
                j, f = jobs[b], frontier[b]
                rows.append((j.slot, j.slot.real + len(fed[b]), len(f)))
                positions += [j.positions[-1] + d - 1] * len(f)
                masks.append(trees[b].ancestor_mask(fed[b], f))
                tokens += [trees[b].tokens[n] for n in f]
            ids = to_device(tokens, self.device, torch.int64)
            batch = self.kv.batch(rows, positions, ids, tree_masks=masks)
            out = self._step(torch.cat([inputs[b] for b in live]), ids, batch, first=False)
            values, ids = self.head.draft_topk(out, topk)
            values, ids = values.tolist(), ids.tolist()
            row = 0
            for b in live:
                new, parent_row = [], {}
                for f in frontier[b]:
                    for n in trees[b].add_children(f, values[row], ids[row]):
                        new.append(n)
                        parent_row[n] = row
                    row += 1
                fed[b] += frontier[b]
                frontier[b] = trees[b].frontier(new)
                index = [parent_row[n] for n in frontier[b]]
                inputs[b] = out[to_device(index, self.device, torch.int64)]
        return [t.drafts(k) for t, k in zip(trees, limits)]

    def _release_finished(self) -> None:
        for r in [r for r in self._tracked.values() if r.finished]:
            self._release(r)

    def _release(self, r: Request) -> None:
        slot = r.plugin_state.pop(STATE_KEY, None)
        self._tracked.pop(id(r), None)
        if slot is not None:
            self.kv.release(slot)

    def close(self) -> None:
        for r in list(self._tracked.values()):
            self._release(r)


@dataclass
class _Job:
    """One drafting request in a `propose` call: its batch index, head KV and new pairs."""

    index: int
    slot: HeadSlot
    feats: torch.Tensor
    ids: list[int]
    positions: list[int]

    def commit(self) -> None:
        """The head has written the new pairs' entries: they are real from now on."""
        self.slot.real += len(self.ids)
        self.slot.next_position = self.positions[-1] + 1


class EagleHead(nn.Module):
    """One decoder layer over `[embedding, feature]` (see the module docstring)."""

    def __init__(self, cfg: dict, eagle3: bool, target, path: str | None = None) -> None:
        super().__init__()
        h = cfg["hidden_size"]
        self.hidden = h
        self.eagle3 = eagle3
        self.num_heads = cfg["num_attention_heads"]
        self.num_kv_heads = cfg.get("num_key_value_heads", self.num_heads)
        self.head_dim = cfg.get("head_dim") or h // self.num_heads
        eps = cfg.get("rms_norm_eps", 1e-6)
        target_h = cfg.get("target_hidden_size") or h
        attn_in = 2 * h if eagle3 else h
        self.fc = nn.Linear(3 * target_h if eagle3 else 2 * h, h, bias=cfg.get("bias", False))
        self.input_layernorm = RMSNorm(h, eps)
        self.hidden_norm = RMSNorm(h, eps) if eagle3 else None
        self.q_proj = nn.Linear(attn_in, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(attn_in, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(attn_in, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, h, bias=False)
        self.post_attention_layernorm = RMSNorm(h, eps)
        inter = cfg["intermediate_size"]
        self.gate_proj = nn.Linear(h, inter, bias=False)
        self.up_proj = nn.Linear(h, inter, bias=False)
        self.down_proj = nn.Linear(inter, h, bias=False)
        self.norm = RMSNorm(h, eps) if eagle3 else None
        draft_vocab = cfg.get("draft_vocab_size") or cfg["vocab_size"]
        self.lm_head = nn.Linear(h, draft_vocab, bias=False) if eagle3 else None
        self.register_buffer("d2t", torch.zeros(draft_vocab, dtype=torch.int64), persistent=False)
        self.maps_ids = False  # whether `d2t` moves any id (a reduced draft vocabulary)
        self.rotary = RotaryEmbedding(
            _rope(cfg), self.head_dim, cfg.get("max_position_embeddings", 4096)
        )
        #: With the fused kernels (`use_fused_kernels`): `dense.linear_fixed_rows`, the q/k/v
        #: and gate/up weights stacked (each projection's weight a view of its rows); else None.
        self.linear = self.qkv_weight = self.gate_up_weight = None
        self.qkv_split = [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2
        # The target's parts, kept out of this module's parameters (`to` must not touch them).
        self.__dict__["embed"] = target.model.embed_tokens
        self.__dict__["target_logits"] = target.compute_logits
        if path is not None:  # None: fresh weights, for training (`pegboard spec train-eagle3`)
            self._load(Path(path))

    def use_fused_kernels(self) -> None:
        """Run the norms and rope as the fused Triton kernels the target runs on CUDA
        (`CausalLM.set_fused_kernels`): a draft step then launches ~40 kernels fewer (an
        RMSNorm one instead of ~8, rope one in place instead of ~14), in the drafting graphs
        too. The projections then go through `dense.linear` as the target's do (its GEMV kernels
        where `gemv.DECODE_CONFIGS` measured them faster than cuBLAS: SmolLM2's o, gate/up and
        down shapes are the head's too), q/k/v and gate/up as one launch each. A catch-up's
        hundreds to thousands of rows go to cuBLAS at a fixed set of row counts, each met once
        here (`fixed_rows`: a row count cuBLAS has not seen cost ~0.2-1.4 ms of host work per
        weight shape on the H200)."""
        from pegboard.core.kernels import dense, fixed_rows

        self.rotary.reset_tables()  # float32 tables, which the kernel reads (`to` cast them)
        for module in (self.input_layernorm, self.hidden_norm, self.post_attention_layernorm,
                       self.norm, self.rotary):  # fmt: skip
            if isinstance(module, (RMSNorm, RotaryEmbedding)):
                module.set_fused_kernels(True)
        self.qkv_weight = _stacked(self.q_proj, self.k_proj, self.v_proj)
        self.gate_up_weight = _stacked(self.gate_proj, self.up_proj)
        self.linear = dense.linear_fixed_rows
        fixed_rows.warm_up([
            (self.fc.weight, self.fc.bias), (self.qkv_weight, None),
            (self.o_proj.weight, self.o_proj.bias), (self.gate_up_weight, None),
            (self.down_proj.weight, self.down_proj.bias),
        ])  # fmt: skip

    def _project(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return layer(x) if self.linear is None else self.linear(x, layer.weight, layer.bias)

    def sglang_tensors(self) -> dict[str, torch.Tensor | None]:
        """SGLang's checkpoint names of this head's parameters (None: absent in this variant)."""
        layer = "midlayer." if self.eagle3 else "layers.0."
        names = {
            "fc.weight": self.fc.weight,
            "fc.bias": self.fc.bias,
            "norm.weight": self.norm.weight if self.norm is not None else None,
            "lm_head.weight": self.lm_head.weight if self.lm_head is not None else None,
        }
        norm = getattr(self.input_layernorm, "weight", None)
        hidden_norm = self.hidden_norm.weight if self.hidden_norm is not None else None
        for ours, theirs in [
            (norm, "input_layernorm.weight"),
            (hidden_norm, "hidden_norm.weight"),
            (self.q_proj.weight, "self_attn.q_proj.weight"),
            (self.k_proj.weight, "self_attn.k_proj.weight"),
            (self.v_proj.weight, "self_attn.v_proj.weight"),
            (self.o_proj.weight, "self_attn.o_proj.weight"),
            (self.post_attention_layernorm.weight, "post_attention_layernorm.weight"),
            (self.gate_proj.weight, "mlp.gate_proj.weight"),
            (self.up_proj.weight, "mlp.up_proj.weight"),
            (self.down_proj.weight, "mlp.down_proj.weight"),
        ]:
            names[layer + theirs] = ours
        return names

    def _load(self, path: Path) -> None:
        from safetensors.torch import load_file

        weights = {}
        for file in sorted(path.glob("*.safetensors")):
            weights.update(load_file(str(file)))
        if not weights:
            raise ValueError(f"no safetensors weights in the EAGLE head directory {path}")
        optional = {"fc.bias", "layers.0.input_layernorm.weight"}  # EAGLE-1 drops that norm
        for name, param in self.sglang_tensors().items():
            if param is None:
                continue
            key = name if name in weights else f"model.{name}"
            if key not in weights:
                if name in optional:
                    continue
                raise ValueError(f"the EAGLE head in {path} has no tensor {name!r}")
            tensor = weights[key]
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(
                    f"the EAGLE head's {name} is {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            param.data.copy_(tensor)
        if not self.eagle3 and "layers.0.input_layernorm.weight" not in weights:
            self.input_layernorm = nn.Identity()
        if "d2t" in weights:
            self.d2t.copy_(weights["d2t"].to(torch.int64))
            self.maps_ids = bool(self.d2t.any())  # (zero: a full vocabulary, as trained here)
        for key in ("embed_tokens.weight", "model.embed_tokens.weight"):
            if key in weights:
                del self.__dict__["embed"]
                self.embed = nn.Embedding.from_pretrained(weights[key], freeze=True)

    def step(self, features, ids: torch.Tensor, positions: torch.Tensor, attention, first: bool):
        """Run the layer on a head step's rows, `attention` prepared for them (`HeadKV.batch`:
        their KV is written at its slots); returns the pre-norm output `[rows, hidden]`."""
        emb = self.embed(ids).to(features.dtype)
        if self.eagle3:
            h = self._project(self.fc, features) if first else features
            residual = h
            x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)
        else:
            h = self._project(self.fc, torch.cat([emb, features], dim=-1))
            residual = h
            x = self.input_layernorm(h)
        n = x.shape[0]
        if self.linear is None:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        else:
            q, k, v = self.linear(x, self.qkv_weight).split(self.qkv_split, dim=-1)
        q = q.view(n, self.num_heads, self.head_dim)
        k = k.view(n, self.num_kv_heads, self.head_dim)
        v = v.view(n, self.num_kv_heads, self.head_dim)
        if self.rotary.kernel is not None:  # (fused: in place)
            self.rotary.rotate_in_place(positions, q, k)
        else:
            q, k = self.rotary(positions, q, k)
        attn = attention.forward(0, q, k, v)
        h2 = self._project(self.o_proj, attn.reshape(n, -1)) + residual
        mlp_in = self.post_attention_layernorm(h2)
        if self.linear is None:
            gate, up = self.gate_proj(mlp_in), self.up_proj(mlp_in)
        else:
            gate, up = self.linear(mlp_in, self.gate_up_weight).chunk(2, dim=-1)
        return self._project(self.down_proj, F.silu(gate) * up) + h2

    def draft_topk(self, out: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of `out`, the `k` best draft tokens' log-probabilities and target ids."""
        if self.eagle3:
            values, ids = self.lm_head(self.norm(out)).float().log_softmax(-1).topk(k, dim=-1)
            return values, ids + self.d2t[ids]
        return self.target_logits(out).float().log_softmax(-1).topk(k, dim=-1)

    def draft_ids(self, out: torch.Tensor) -> torch.Tensor:
        """Per row of `out`, the head's best guess as a target id (on the device)."""
        if self.eagle3:
            draft = self.lm_head(self.norm(out)).argmax(dim=-1)
            return draft + self.d2t[draft] if self.maps_ids else draft
        return self.target_logits(out).argmax(dim=-1)


def _stacked(*layers: nn.Linear) -> torch.Tensor:
    """The layers' weights stacked along the output dimension, each layer's weight becoming a
    view of its rows (one copy in memory; for serving: the views need no gradient)."""
    stacked = torch.cat([layer.weight.detach() for layer in layers])
    start = 0
    for layer in layers:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(stacked[start : start + rows], requires_grad=False)
        start += rows
    return stacked


def _rope(cfg: dict) -> RopeConfig:
    scaling = cfg.get("rope_scaling") or {}
    kind = scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "llama3":
        return RopeConfig(theta=cfg.get("rope_theta", 10000.0))
    return RopeConfig(
        theta=cfg.get("rope_theta", 10000.0),
        type="llama3",
        factor=scaling.get("factor", 1.0),
        low_freq_factor=scaling.get("low_freq_factor", 1.0),
        high_freq_factor=scaling.get("high_freq_factor", 4.0),
        original_max_position_embeddings=scaling.get("original_max_position_embeddings"),
    )
