"""The served context must fit the KV cache: a request as long as the context (prompt plus
output) needs that many KV slots. A cache smaller than that would cut such requests short
with finish reason `length` long before their `max_tokens` — silently. So at start-up:

- the context length was asked for (`--max-model-len`): refuse to start, naming both sizes;
- it is the model's own: serve a shorter context (the cache's capacity) and say so in the log;
  `/v1/models` reports the served `max_model_len` and longer prompts get a clear 400.
"""

from __future__ import annotations

import logging

from pegboard.sdk.slots import KVCache
from pegboard.sdk.types import ModelInfo

log = logging.getLogger("pegboard.engine")


class KVCapacityError(RuntimeError):
    """The KV cache cannot hold one request of the asked-for context length."""


def fit_context_to_kv(info: ModelInfo, kv: KVCache, requested: int | None) -> None:
    """Lower `info.max_model_len` to what `kv` holds, or raise if it was `requested`."""
    capacity = kv.num_pages * kv.page_size
    if info.max_model_len <= capacity:
        return
    if requested is not None:
        raise KVCapacityError(
            f"--max-model-len {info.max_model_len} needs room for {info.max_model_len} tokens "
            f"of one request in the KV cache, but the cache holds {capacity} tokens; raise "
            "--kv-cache-tokens (or --gpu-memory-utilization) or lower --max-model-len"
        )
    log.warning(
        "the KV cache holds %d tokens, less than the model's context length %d: serving a "
        "context of %d tokens (raise --kv-cache-tokens to serve the full context)",
        capacity,
        info.max_model_len,
        capacity,
    )
    info.max_model_len = capacity
