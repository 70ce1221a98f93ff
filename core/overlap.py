"""Overlap scheduling: the host reads a step's sampled tokens one step later.

Without overlap, every step ends by copying the sampled tokens to the host, which waits for the
GPU to finish; the GPU then idles while the host schedules, allocates and prepares the next
step. With overlap (the default; `--disable-overlap` turns it off), a step's tokens stay on
the device (`PendingStep`) and the engine goes on:

    step N+1:  schedule -> allocate_kv -> prepare -> launch forward N+1
               -> resolve step N (wait for its tokens, append, detokenize, stop, stream)
               -> sample N+1 (left pending)

so the host's work for step N+1 runs while the GPU computes step N, and step N's bookkeeping
runs while the GPU computes step N+1. Until step N is resolved, each of its requests carries
`PENDING_TOKEN` as its last token id: the scheduler and the KV cache count it (its KV is
computed in step N+1 like any decode token) and `ModelRunner.prepare` fills it into step N+1's
input ids on the device from `PendingStep.tokens`. A request that finishes with its step-N
token has already been scheduled in step N+1: that one extra row is computed and dropped
before sampling, as in SGLang. The engine resolves the pending step before anything that
rewinds or releases a request (preemption, abort, a plugin swap), so no plugin ever sees a
placeholder where it would store or compare token ids.
"""

from __future__ import annotations

import functools

import torch
from pegboard.sdk.types import Request, SampleOutput, TokenLogprobs

#: The token id a request carries while its last sampled token is still on the device.
PENDING_TOKEN = -1


class PendingStep:
    """The sampled tokens of the last launched step, not yet read by the host.

    Creating it appends `PENDING_TOKEN` to every sampling request and, for a CUDA tensor,
    starts an asynchronous copy to pinned host memory; `take()` waits for that copy only.
    """

    def __init__(
        self, requests: list[Request], sampled: SampleOutput, vocab_size: int | None = None
    ) -> None:
        if len(sampled) != len(requests):
            raise ValueError(
                f"the sampler returned {len(sampled)} tokens for {len(requests)} requests"
            )
        self.requests = requests
        self.logprobs: list[TokenLogprobs | None] = list(sampled.logprobs)
        self.tokens: torch.Tensor | None = sampled.tokens  # on the device, for the next inputs
        self._ids: list[int] | None = None if self.tokens is not None else sampled.token_ids
        self._host: torch.Tensor | None = None
        self._ready: torch.cuda.Event | None = None
        if self.tokens is not None:
            self.tokens = self.tokens.reshape(-1).to(torch.int64)
            if self.tokens.device.type == "cuda":
                self._host = torch.empty(self.tokens.shape, dtype=torch.int64, pin_memory=True)
                self._host.copy_(self.tokens, non_blocking=True)
                self._ready = torch.cuda.Event()
                self._ready.record()
                if vocab_size:  # the host range-checks the raw ids (`on_device`); the next
                    # step's inputs must never index past the embedding meanwhile
                    self.tokens = self.tokens.clamp(0, vocab_size - 1)
        #: Whether the ids come from a device tensor and are unchecked until `take()`.
        self.on_device = self._ready is not None
        for r in requests:
            r.token_ids.append(PENDING_TOKEN)

    @functools.cached_property
    def rows(self) -> dict[int, int]:
        """id(request) -> its row in `tokens` (built on first use: a step whose batch is this
        one's, in the same order, needs no lookup)."""
        return {id(r): i for i, r in enumerate(self.requests)}

    def take(self) -> list[int]:
        """The sampled token ids on the host (waits for this step's copy, nothing later)."""
        if self._ids is None:
            if self._ready is not None:
                self._ready.synchronize()
                self._ids = self._host.tolist()
            else:
                self._ids = self.tokens.tolist()
        return self._ids

    @property
    def host_array(self):
        """After `take()`, the ids as an int64 numpy array over the pinned host copy (for the
        range check); None when the ids did not come from a device tensor."""
        return self._host.numpy() if self._host is not None else None

    @property
    def host_ids(self) -> list[int] | None:
        """The token ids if the host has them already (a sampler that returned a list, or a
        step already taken), else None: then they are only in `tokens`, on the device."""
        return self._ids
