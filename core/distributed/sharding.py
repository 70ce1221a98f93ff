"""How a decoder is split over tensor-parallel ranks (Megatron-style), and the layers that put
the pieces back together.

- q/k/v (fused) and gate/up (fused) are column-parallel: each rank holds its heads' rows (its
  KV heads; when there are fewer KV heads than ranks, each KV head is replicated on
  `tp / kv_heads` ranks) and its slice of the intermediate columns. They need no communication.
- o_proj and down_proj are row-parallel: each rank holds the input columns of its heads /
  intermediate slice; their partial outputs are summed by one all-reduce each. A bias is
  loaded on rank 0 only, so the sum adds it once.
- The embedding and the LM head are vocab-parallel: each rank holds `ceil(vocab / tp)` rows
  (the last rank's tail zero-padded). The embedding looks up the ids in its range and an
  all-reduce sums the rows; the LM head's logits are all-gathered and the padding cut off.

Each rank reads only its slice of each checkpoint tensor (safetensors `get_slice`).

With expert parallelism (`ep_redundant` not None: `--ep-size` equal to the group) a sparse
layer's routed experts are not split but spread: each rank holds its share of the physical
slots (`pegboard.core.moe.expert_parallel`), a Qwen2-MoE shared expert is split like a dense
MLP, and one all-reduce per sparse layer sums the experts' and the shared expert's partials.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from pegboard.core.distributed.fused_norm import ATTENTION, MLP
from pegboard.core.distributed.topology import check_divisible
from pegboard.core.models.errors import ModelLoadError
from pegboard.core.models.moe import MoEBlock
from pegboard.core.moe.expert_parallel import ExpertParallel
from torch import nn
from torch.nn import functional as F

#: Checkpoint name suffix (projection) -> how it is split: "heads" / "kv_heads" / "ffn" along
#: the output rows, "heads_in" / "ffn_in" along the input columns.
_COLUMN = {"q_proj": "heads", "k_proj": "kv_heads", "v_proj": "kv_heads"}
_COLUMN.update(gate_proj="ffn", up_proj="ffn")
_ROW = {"o_proj": "heads", "down_proj": "ffn"}
_VOCAB = ("embed_tokens", "lm_head")


class ModelShard:
    """Rank `rank` of `size`'s part of a model with `cfg` (a `ModelConfig`).

    `communicate` provides the collectives (`all_reduce(x)` in place, `all_gather(x)` along
    the last dimension); the loader calls `local_config`, `local_shape`, `read` and `install`.
    """

    def __init__(
        self, cfg, rank: int, size: int, communicate, ep_redundant: int | None = None
    ) -> None:
        check_divisible(cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size, size)
        self.cfg = cfg
        self.rank = rank
        self.size = size
        self.comm = communicate
        self.heads = cfg.num_heads // size
        self.kv_heads = max(cfg.num_kv_heads // size, 1)
        # With replication, rank r serves KV head r // (size / kv_heads).
        kv_first = (
            rank * self.kv_heads if cfg.num_kv_heads >= size else rank // (size // cfg.num_kv_heads)
        )
        self.vocab = -(-cfg.vocab_size // size)
        self.vocab_start = rank * self.vocab
        self.vocab_end = min(cfg.vocab_size, self.vocab_start + self.vocab)
        ffn = cfg.intermediate_size // size
        hd = cfg.head_dim
        self.ranges = {
            "heads": (rank * self.heads * hd, self.heads * hd),
            "kv_heads": (kv_first * hd, self.kv_heads * hd),
            "ffn": (rank * ffn, ffn),
        }
        self.moe = None  # this rank's MoEConfig under expert parallelism
        if ep_redundant is not None and cfg.moe is not None:
            shared = cfg.moe.shared_expert_size // size
            self.ranges["shared"] = (rank * shared, shared)
            self.moe = dataclasses.replace(
                cfg.moe,
                num_physical=cfg.moe.num_experts + ep_redundant,
                ep_rank=rank,
                ep_size=size,
                shared_expert_size=shared,
            )

    def local_config(self, cfg=None):
        """The `ModelConfig` this rank builds its layers from: its heads, KV heads, intermediate
        columns and vocab rows."""
        return dataclasses.replace(
            cfg or self.cfg,
            num_heads=self.heads,
            num_kv_heads=self.kv_heads,
            intermediate_size=self.ranges["ffn"][1],
            vocab_size=self.vocab,
            moe=self.moe or (cfg or self.cfg).moe,
        )

    def _split(self, name: str) -> tuple[int, int, int] | None:
        """(dim, start, length) of the slice of tensor `name` this rank holds, None if whole."""
        parts = name.split(".")
        module, kind = parts[-2] if len(parts) > 1 else "", parts[-1]
        if self.moe is not None and "experts" in parts:
            return None  # whole experts; each rank keeps those of its slots
        if self.moe is not None and "shared_expert" in parts and module in _COLUMN | _ROW:
            return (0 if module in _COLUMN else 1, *self.ranges["shared"])
        if module in _COLUMN:
            return (0, *self.ranges[_COLUMN[module]])
        if module in _ROW and kind == "weight":
            return (1, *self.ranges[_ROW[module]])
        if module in _VOCAB and kind == "weight":
            return (0, self.vocab_start, self.vocab_end - self.vocab_start)
        return None

    def local_shape(self, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape this rank's parameter has for checkpoint tensor `name` of `shape`."""
        split = self._split(name)
        if split is None:
            return tuple(shape)
        dim, _, length = split
        if name.split(".")[-2] in _VOCAB:
            length = self.vocab  # padded
        return tuple(length if d == dim else s for d, s in enumerate(shape))

    def read(self, handle, name: str) -> torch.Tensor:
        """This rank's part of checkpoint tensor `name`, reading only that slice."""
        parts = name.split(".")
        if len(parts) > 1 and parts[-2] in _ROW and parts[-1] == "bias" and self.rank != 0:
            return torch.zeros(handle.get_slice(name).get_shape())  # summed once, on rank 0
        piece = handle.get_slice(name)
        split = self._split(name)
        if split is None:
            return handle.get_tensor(name)
        dim, start, length = split
        index = (slice(None),) * dim + (slice(start, start + length),)
        tensor = piece[index]
        if parts[-2] in _VOCAB and length < self.vocab:
            tensor = F.pad(tensor, (0, 0, 0, self.vocab - length))
        return tensor

    def install(self, model: nn.Module) -> None:
        """Make the loaded shard compute the whole model's result: all-reduce after the
        row-parallel projections (on CUDA at decode sizes fused with the RMSNorm after each:
        `pegboard.core.distributed.fused_norm`, kept as `model.tp_fused_norm`, else None),
        the vocab-parallel embedding, the gathered LM head."""
        for name, module in model.named_modules():
            if getattr(module, "loads_by_parameter", True) is False:
                raise ModelLoadError(
                    f"{name}: {type(module).__name__} layers (quantized weights) cannot be "
                    "split over tensor-parallel ranks yet; serve this checkpoint with --tp-size 1"
                )
        body = model.model
        body.embed_tokens = VocabParallelEmbedding(
            body.embed_tokens.weight, self.vocab_start, self.vocab_end, self.comm.all_reduce
        )
        fused = None  # the all-reduces fused with the norms after them (`fused_norm`)
        if not any(isinstance(layer.mlp, MoEBlock) for layer in body.layers):
            fused = self.comm.fused_add_norm(self.cfg.hidden_size, body.norm.weight.dtype)
        model.tp_fused_norm = fused
        # The norm each layer's MLP output goes to next: the next layer's, then the final one.
        after_mlp = [layer.input_layernorm for layer in body.layers[1:]] + [body.norm]
        for layer, norm in zip(body.layers, after_mlp):
            if fused is not None:
                fused.join(layer.self_attn.o_proj, layer.post_attention_layernorm, ATTENTION)
                fused.join(layer.mlp.down_proj, norm, MLP)
                continue
            layer.self_attn.o_proj.register_forward_hook(_output(self.comm.all_reduce))
            if isinstance(layer.mlp, MoEBlock):  # its own all-reduce sums experts and shared
                physical = self.moe.num_physical
                layer.mlp.ep = ExpertParallel(self.rank, self.size, physical, self.comm)
            else:
                layer.mlp.down_proj.register_forward_hook(_output(self.comm.all_reduce))
        vocab = self.cfg.vocab_size
        gather = self.comm.all_gather
        model.lm_head.register_forward_hook(_output(lambda x: gather(x)[..., :vocab]))


def _output(fn: Callable[[torch.Tensor], torch.Tensor]):
    def hook(module: nn.Module, args, output: torch.Tensor) -> torch.Tensor:
        return fn(output)

    return hook


class VocabParallelEmbedding(nn.Module):
    """The embedding rows `[start, end)` of the vocabulary on this rank: ids outside the range
    give zero rows, and the all-reduce fills each row from the rank that holds it."""

    def __init__(self, weight: nn.Parameter, start: int, end: int, all_reduce) -> None:
        super().__init__()
        self.weight = weight
        self.start, self.end = start, end
        self.all_reduce = all_reduce

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        outside = (ids < self.start) | (ids >= self.end)
        local = (ids - self.start).masked_fill(outside, 0)
        rows = F.embedding(local, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return self.all_reduce(rows)
