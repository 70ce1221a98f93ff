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
The head keeps its own KV per request (`request.plugin_state["eagle"]`): real entries for
every target position it has seen, plus this step's draft positions, dropped next step.

With `topk` > 1 the head drafts a tree (EAGLE-2, `tree_search.DraftTree`): best-first by the
head's confidence, `num_steps` deep, `num_draft_tokens` nodes, the greedy chain as its first
path. Expanded nodes attend to the real entries, their ancestors and themselves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pydantic
import torch
from pegboard.core.models.config import RopeConfig
from pegboard.core.models.layers import RMSNorm
from pegboard.core.models.rope import RotaryEmbedding
from pegboard.core.speculative.hidden import FEATURES_KEY
from pegboard.plugins.speculative.tree_search import DraftTree
from pegboard.sdk.slots import PluginContext, Speculator
from pegboard.sdk.types import Drafts, Request
from torch import nn
from torch.nn import functional as F

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
        self.head: EagleHead | None = None  # built by `bind_target`, with the target's parts
        self.target_layers: list[int] | str = "final"

    def bind_target(self, model) -> None:
        """Called by the core once, before the first `propose`: the target model, whose
        embedding (and for EAGLE-1/2 LM head) the head shares and whose layers it reads."""
        num_layers = len(model.model.layers)
        self.target_layers = aux_layers(self.config, num_layers) if self.eagle3 else "final"
        self.head = EagleHead(self.config, self.eagle3, model, self.options.model_path)
        self.head.to(device=self.device, dtype=self.dtype).eval()

    @torch.inference_mode()
    def propose(self, requests: list[Request], max_tokens: list[int]) -> list[Drafts]:
        out = []
        for r, k in zip(requests, max_tokens):
            k = min(k, self.options.num_draft_tokens)
            out.append(self._draft(r, k) if k and self.head is not None else Drafts([]))
        return out

    def _draft(self, r: Request, k: int) -> Drafts:
        state: HeadCache = r.plugin_state.get(STATE_KEY)
        if state is None:
            state = r.plugin_state[STATE_KEY] = HeadCache()
        state.rollback()
        tokens = r.token_ids
        pending = r.plugin_state.pop(FEATURES_KEY, [])
        feats, positions = [], []
        for start, block in pending:  # pairs (feature at t, token t + 1) not seen yet
            lo = max(state.next_position - start, 0)
            hi = min(block.shape[0], len(tokens) - 1 - start)
            if hi > lo:
                feats.append(block[lo:hi])
                positions.extend(range(start + lo, start + hi))
        if not positions:
            return Drafts([])
        ids = [tokens[t + 1] for t in positions]
        hidden = self.head.step(
            torch.cat(feats), ids, positions, state, first=True
        )  # [n, hidden]; the last row predicts the token after the context
        state.commit(positions[-1] + 1)
        if self.options.topk > 1:
            depth = min(self.options.num_steps or self.options.num_draft_tokens, k)
            return draft_tree(self.head, state, hidden[-1:], positions[-1], self.options.topk,
                              depth, k)  # fmt: skip
        drafts = []
        last, pos = hidden[-1:], positions[-1]
        for _ in range(k):
            token = self.head.draft_token(last)
            drafts.append(token)
            pos += 1
            last = self.head.step(last, [token], [pos], state, first=False)
        return Drafts(drafts)


def draft_tree(head, state, last, pos: int, topk: int, depth: int, limit: int) -> Drafts:
    """EAGLE-2's draft tree (`tree_search`) from the head output `last` `[1, H]` at the
    context's last position `pos`; expanded nodes attend to the real entries and their
    ancestors."""
    tree = DraftTree(topk)
    values, ids = head.draft_topk(last, topk)
    frontier = tree.add_children(-1, values[0].tolist(), ids[0].tolist())
    inputs = last.expand(topk, -1)
    row_of: dict[int, int] = {}  # expanded node -> its row among the head's draft entries
    for d in range(2, depth + 1):
        before = len(state.positions) - state.real
        mask = torch.zeros(len(frontier), before + len(frontier), dtype=torch.bool)
        for j, f in enumerate(frontier):
            row_of[f] = before + j
            a = f
            while a >= 0:
                mask[j, row_of[a]] = True
                a = tree.parents[a]
        out = head.step(inputs, [tree.tokens[f] for f in frontier], [pos + d - 1] * len(frontier),
                        state, first=False, tree_mask=mask.to(last.device))  # fmt: skip
        values, ids = head.draft_topk(out, topk)
        new, parent_row = [], {}
        for j, f in enumerate(frontier):
            for i in tree.add_children(f, values[j].tolist(), ids[j].tolist()):
                new.append(i)
                parent_row[i] = j
        frontier = tree.frontier(new)
        inputs = out[torch.tensor([parent_row[i] for i in frontier], device=out.device)]
    return tree.drafts(limit)


class HeadCache:
    """The head's KV for one request: `real` entries from target positions, then drafts."""

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.positions: list[int] = []
        self.real = 0
        self.next_position = 0

    def rollback(self) -> None:
        del self.positions[self.real :]

    def commit(self, next_position: int) -> None:
        self.real = len(self.positions)
        self.next_position = next_position

    def append(self, k: torch.Tensor, v: torch.Tensor, positions: list[int]) -> None:
        n = len(self.positions)
        need = n + k.shape[0]
        if self.k is None or need > self.k.shape[0]:
            cap = max(need, 2 * (self.k.shape[0] if self.k is not None else 16))
            grown_k = k.new_empty((cap, *k.shape[1:]))
            grown_v = v.new_empty((cap, *v.shape[1:]))
            if self.k is not None:
                grown_k[:n], grown_v[:n] = self.k[:n], self.v[:n]
            self.k, self.v = grown_k, grown_v
        self.k[n:need], self.v[n:need] = k, v
        self.positions.extend(positions)


class EagleHead(nn.Module):
    """One decoder layer over `[embedding, feature]` (see the module docstring)."""

    def __init__(self, cfg: dict, eagle3: bool, target, path: str | None = None) -> None:
        super().__init__()
        h = cfg["hidden_size"]
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
        self.rotary = RotaryEmbedding(
            _rope(cfg), self.head_dim, cfg.get("max_position_embeddings", 4096)
        )
        # The target's parts, kept out of this module's parameters (`to` must not touch them).
        self.__dict__["embed"] = target.model.embed_tokens
        self.__dict__["target_logits"] = target.compute_logits
        if path is not None:  # None: fresh weights, for training (`pegboard spec train-eagle3`)
            self._load(Path(path))

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
        for key in ("embed_tokens.weight", "model.embed_tokens.weight"):
            if key in weights:
                del self.__dict__["embed"]
                self.embed = nn.Embedding.from_pretrained(weights[key], freeze=True)

    def step(
        self, features, ids, positions, cache: HeadCache, first: bool, tree_mask=None
    ) -> torch.Tensor:
        """Run the layer on new rows (appending their KV); returns the pre-norm output.
        `tree_mask` `[new rows, draft entries + new rows]`: which of the cache's draft entries
        (after the real ones) each new row sees; None: all before it (a chain)."""
        device = features.device
        emb = self.embed(torch.tensor(ids, device=device)).to(features.dtype)
        if self.eagle3:
            h = self.fc(features) if first else features
            residual = h
            x = torch.cat([self.input_layernorm(emb), self.hidden_norm(h)], dim=-1)
        else:
            h = self.fc(torch.cat([emb, features], dim=-1))
            residual = h
            x = self.input_layernorm(h)
        attn = self._attend(x, positions, cache, tree_mask)
        h2 = attn + residual
        mlp_in = self.post_attention_layernorm(h2)
        out = self.down_proj(F.silu(self.gate_proj(mlp_in)) * self.up_proj(mlp_in)) + h2
        return out

    def _attend(self, x, positions, cache: HeadCache, tree_mask=None) -> torch.Tensor:
        n = x.shape[0]
        pos = torch.tensor(positions, device=x.device)
        q = self.q_proj(x).view(n, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(n, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(n, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(pos, q, k)
        before = len(cache.positions)
        cache.append(k, v, positions)
        keys = cache.k[: before + n].transpose(0, 1)
        values = cache.v[: before + n].transpose(0, 1)
        mask = torch.ones(n, before + n, dtype=torch.bool, device=x.device).tril(before)
        if tree_mask is not None:
            mask[:, cache.real :] = tree_mask
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1), keys, values, attn_mask=mask,
            scale=1 / math.sqrt(self.head_dim), enable_gqa=self.num_heads != self.num_kv_heads,
        )  # fmt: skip
        return self.o_proj(out.transpose(0, 1).reshape(n, -1))

    def draft_topk(self, out: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row of `out`, the `k` best draft tokens' log-probabilities and target ids."""
        if self.eagle3:
            values, ids = self.lm_head(self.norm(out)).float().log_softmax(-1).topk(k, dim=-1)
            return values, ids + self.d2t[ids]
        return self.target_logits(out).float().log_softmax(-1).topk(k, dim=-1)

    def draft_token(self, out: torch.Tensor) -> int:
        if self.eagle3:
            draft = int(self.lm_head(self.norm(out)).argmax(dim=-1))
            return draft + int(self.d2t[draft])
        return int(self.target_logits(out).argmax(dim=-1))


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
