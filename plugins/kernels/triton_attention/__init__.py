"""Triton kernels of the `triton` attention backend (`pegboard.plugins.kernels.attention_triton`).

- `store_kv` — writes the step's new keys and values into their pool slots.
- `decode_attention` — one query token per request: a split-K paged decode kernel plus a
  reduce kernel that merges the splits; its launch variants (`DecodeConfig`) and the table
  of which one runs per batch size are in `decode_configs`.
- `extend_attention` — prefill, chunked prefill and mixed batches: causal attention of the new
  tokens over each request's cached prefix and themselves.

Importing this package imports Triton. Set `TRITON_INTERPRET=1` before that import to run the
kernels on CPU tensors in Triton's interpreter (slow; for tests).
"""

from pegboard.plugins.kernels.triton_attention.decode import (
    choose_num_splits,
    decode_attention,
    decode_block_n,
    decode_workspace,
    launch_order,
)
from pegboard.plugins.kernels.triton_attention.decode_configs import (
    DECODE_DEFAULTS,
    DECODE_VARIANTS,
    DecodeConfig,
    decode_config,
)
from pegboard.plugins.kernels.triton_attention.extend import (
    build_block_map,
    extend_attention,
    extend_block_m,
    max_blocks,
    padded_block_map,
    tokens_per_block,
)
from pegboard.plugins.kernels.triton_attention.store_kv import store_kv

__all__ = [
    "DECODE_DEFAULTS",
    "DECODE_VARIANTS",
    "DecodeConfig",
    "build_block_map",
    "launch_order",
    "choose_num_splits",
    "decode_attention",
    "decode_block_n",
    "decode_config",
    "decode_workspace",
    "extend_attention",
    "extend_block_m",
    "max_blocks",
    "padded_block_map",
    "store_kv",
    "tokens_per_block",
]
