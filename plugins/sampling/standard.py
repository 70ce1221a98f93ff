"""The default sampler: greedy, temperature, top-k, top-p, min-p, penalties, seeds, logprobs."""

from __future__ import annotations

import functools
import importlib.util
from typing import Literal

import numpy as np
import pydantic
import torch
from pegboard.plugins.sampling.filters import apply_min_p, apply_top_k_top_p
from pegboard.plugins.sampling.penalties import apply_penalties
from pegboard.sdk.device import to_device
from pegboard.sdk.sampling import COLUMN, SamplingBatch, sampling_of
from pegboard.sdk.slots import Sampler
from pegboard.sdk.types import Request, SampleOutput, TokenLogprobs

#: The `plugin_state` key of a request's random generator. Fixed (not the plugin's name) so that
#: a sampler swapped in mid-request continues the same random stream.
GENERATOR_KEY = "sampler"
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant: spreads (engine seed, seq) over the seed space


class StandardSamplerOptions(pydantic.BaseModel):
    """Options of the `standard` sampler."""

    model_config = pydantic.ConfigDict(extra="forbid")

    seed: int = pydantic.Field(0, description="seeds requests that set no seed of their own")
    gumbel_noise: Literal["philox", "hash"] = pydantic.Field(
        "philox",
        description="the CUDA Gumbel kernel's random numbers: 'philox' (a seed gives the tokens "
        "it gave before 2026-11-30) or 'hash' (~3x fewer instructions per token, other tokens "
        "per seed; not yet measured on a GPU: docs/kernels.md)",
    )
    triton_argmax: bool = pydantic.Field(
        False,
        description="all-greedy batches on CUDA by the Gumbel module's split-row argmax kernel "
        "instead of torch.argmax (same tokens; not yet measured on a GPU: docs/kernels.md)",
    )


class StandardSampler(Sampler):
    """Vectorised sampling over the batch, one random stream per request.

    Order of operations per row: raw logprobs (for `params.logprobs`) → penalties → greedy
    argmax, or temperature → top-k / top-p → min-p → draw. A draw is the exponential race
    `argmax(probs / q)` with `q ~ Exp(1)` taken from the request's own `torch.Generator`
    (`request.plugin_state["sampler"]`), which picks token `i` with probability `probs[i]`
    and makes a seeded request's tokens independent of what else is in the batch.
    """

    Options = StandardSamplerOptions
    # bf16 logits (the engine's copy to float32 skipped): argmax and the Gumbel kernel read
    # them as they are, every other path converts the rows it computes on.
    logits_in_model_dtype = True

    def __init__(self, options: pydantic.BaseModel | None = None) -> None:
        super().__init__(options)
        self._facts: _BatchFacts | None = None  # the last batch's, reused while it recurs

    def sample(self, logits: torch.Tensor, requests: list[Request]) -> SampleOutput:
        facts = self._batch_facts(requests, logits.shape[-1])
        want_logprobs = facts.want_logprobs
        raw_logprobs = None
        if want_logprobs:
            raw_logprobs = logits[want_logprobs].float().log_softmax(dim=-1)
        if facts.penalties:
            logits = apply_penalties(logits.float(), requests, facts.batch)

        if facts.greedy:
            tokens = _argmax(logits) if self.options.triton_argmax else logits.argmax(dim=-1)
        else:
            tokens = self._draw(logits, requests, facts)

        logprobs: list[TokenLogprobs | None] = [None] * len(requests)
        if raw_logprobs is not None:
            rows = _logprobs(raw_logprobs, tokens[want_logprobs], facts.num_top)
            for i, row in zip(want_logprobs, rows):
                logprobs[i] = row
        # A device tensor: the engine copies it to the host without blocking (overlap).
        return SampleOutput(token_ids=tokens, logprobs=logprobs)

    def _batch_facts(self, requests: list[Request], vocab: int) -> _BatchFacts:
        """What the batch's parameters say (`requests.sampling` from the engine, else read
        from the requests); recomputed only when the batch changed (the same request objects
        in the same order, as in consecutive decode steps, reuse it)."""
        last = self._facts
        if last is not None and last.vocab == vocab and last.requests == requests:
            return last
        batch = sampling_of(requests)
        self._facts = _BatchFacts(list(requests), vocab, self.options.seed, batch)
        return self._facts

    def warm_up(self, vocab_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """On CUDA, the Gumbel kernel once for each logits dtype it meets: `dtype` and float32
        (rows with penalties are converted), and the argmax kernel with `triton_argmax`; their
        keys do not depend on the batch (`gumbel.most_chunks`) nor on the step (the seeds'
        `advance` is not specialized on), so no step compiles them."""
        if not _gumbel_available(device):
            return
        from pegboard.plugins.sampling.gumbel import argmax, gumbel_sample

        one = torch.ones(1, dtype=torch.float32, device=device)
        states = torch.zeros(1, dtype=torch.int64, device=device)
        noise = self.options.gumbel_noise
        for logits_dtype in dict.fromkeys((dtype, torch.float32)):
            logits = torch.zeros(1, vocab_size, dtype=logits_dtype, device=device)
            # Seeds derived from states (`_seed_state`), as every step draws them.
            gumbel_sample(logits, None, None, inv_temperature=one, noise=noise, states=states)
            if self.options.triton_argmax:
                argmax(logits)

    def _draw(
        self, logits: torch.Tensor, requests: list[Request], facts: _BatchFacts | None = None
    ) -> torch.Tensor:
        """Sample one token per row; greedy rows take the argmax and consume no randomness.

        On CUDA, rows without top-k / top-p / min-p are drawn by the one-pass Gumbel-max
        kernel (`gumbel.py`); the others by `_draw_filtered`. Which path a row takes depends
        only on its own parameters, so a seeded request's draws never depend on its batch."""
        if facts is None:
            facts = _BatchFacts(requests, logits.shape[-1], self.options.seed)
        plain, batch = facts.plain, facts.batch
        if not plain or not _gumbel_available(logits.device):
            return self._draw_filtered(logits, requests, batch)
        if len(plain) == len(requests):
            return self._gumbel(logits, requests, facts)
        split = facts.split(logits.device)  # kept while the batch recurs, as `facts`
        tokens = torch.empty(len(requests), dtype=torch.int64, device=logits.device)
        plain_rows, rest_rows = split.plain_rows, split.rest_rows
        tokens[plain_rows] = self._gumbel(logits[plain_rows], split.plain.requests, split.plain)
        tokens[rest_rows] = self._draw_filtered(
            logits[rest_rows], split.rest_requests, split.rest_batch
        )
        return tokens

    def _gumbel(
        self, logits: torch.Tensor, requests: list[Request], facts: _BatchFacts | None = None
    ) -> torch.Tensor:
        """Every row of `requests` by the Gumbel kernel (`facts`: of exactly these rows, else
        read from the requests)."""
        from pegboard.plugins.sampling.gumbel import gumbel_sample, inverse_temperature

        if facts is None:
            facts = _BatchFacts(requests, logits.shape[-1], self.options.seed)
        inv = facts.inv_temperature  # kept while the batch recurs
        if inv is None or inv.device != logits.device:
            facts.inv_temperature = inverse_temperature(facts.temperature(logits.device))
        states, advance = self._seed_state(requests, facts, logits.device)
        return gumbel_sample(
            logits,
            None,
            None,
            inv_temperature=facts.inv_temperature,
            noise=self.options.gumbel_noise,
            states=states,
            advance=advance,
        )

    def _seed_state(
        self, requests: list[Request], facts: _BatchFacts, device: torch.device
    ) -> tuple[torch.Tensor, int]:
        """The Gumbel kernel's seeds as (`states` on the device, `advance`): the kernel
        derives each row's seed from them, bitwise `_draw_seeds`' (`gumbel._row_seed`).

        A draw's seed is splitmix64's output for state `base + (drawn + 1) * _MIX`, so a row
        that drew `k` more tokens since its state was uploaded has the seed of that state
        advanced by `k`. While every row advanced by the same `k` (a recurring decode batch:
        one token each per step) the uploaded states serve with that `k`, no host arithmetic
        and no copy; otherwise (rows drew unevenly, a new batch or device) the states are
        rebuilt from the current lengths and uploaded, with `k = 0`. Nothing is assumed about
        how many tokens a step appended: the lengths are read every call."""
        drawn = np.fromiter([len(r.output_token_ids) for r in requests], np.int64, len(requests))
        states, drawn0 = facts.seed_states, facts.seed_drawn
        if states is not None and states.device == device:
            advance = drawn - drawn0
            k = int(advance[0]) if len(advance) else 0
            if 0 <= k < 2**31 and (advance == k).all():
                return states, k
        base = facts.base_seeds  # None where every row is greedy (their seeds go unused)
        if base is None:
            base = _base_seeds(facts.batch, self.options.seed)
        mixed = _splitmix_states(base, drawn.astype(np.uint64))
        facts.seed_states = to_device(mixed.view(np.int64), device)
        facts.seed_drawn = drawn
        return facts.seed_states, 0

    def _draw_seeds(self, requests: list[Request], base: np.ndarray | None = None) -> np.ndarray:
        """A fresh 63-bit seed per draw: the request's seed (or, unseeded, the sampler's seed
        and its arrival number) mixed with how many tokens it has drawn (splitmix64). The
        host's reference for what the kernel derives (`_seed_state`); tests and scripts pass
        these as explicit seeds."""
        if base is None:
            base = _base_seeds(SamplingBatch.of(requests), self.options.seed)
        drawn = np.fromiter([len(r.output_token_ids) for r in requests], np.uint64, len(requests))
        x = _splitmix_states(base, drawn)
        with np.errstate(over="ignore"):
            x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
            x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
            x = x ^ (x >> np.uint64(31))
        return (x & np.uint64(2**63 - 1)).astype(np.int64)

    def _draw_filtered(
        self, logits: torch.Tensor, requests: list[Request], batch: SamplingBatch | None = None
    ) -> torch.Tensor:
        """The general path: temperature, top-k / top-p, min-p, then an exponential race drawn
        from each request's own `torch.Generator`."""
        batch = batch if batch is not None else sampling_of(requests)
        logits = logits.float()  # no copy when it is float32 already
        device, vocab = logits.device, logits.shape[-1]
        k = batch.column("top_k")
        filtered_k = (k > 0) & (k < vocab)  # rows whose top-k filters anything
        # The rows' parameters on the device, float64 (one gather of the core's table).
        table = batch.on_device(device)
        temperature, top_k = table[:, COLUMN["temperature"]], table[:, COLUMN["top_k"]]
        top_k = torch.where((top_k > 0) & (top_k < vocab), top_k, float(vocab))
        top_p, min_p = table[:, COLUMN["top_p"]], table[:, COLUMN["min_p"]]
        greedy = temperature == 0.0
        scaled = logits / torch.where(greedy, 1.0, temperature).to(logits.dtype).unsqueeze(1)

        sampled = batch.column("temperature") != 0.0
        use_top_k = bool(filtered_k.any())
        use_top_p = bool((batch.column("top_p") < 1.0).any())
        if use_top_k or use_top_p:
            # Greedy rows ignore filters, so only sampled rows decide how much must be sorted.
            sampled_k = np.where(filtered_k, k, vocab)[sampled]
            scaled = apply_top_k_top_p(
                scaled,
                top_k.long() if use_top_k else None,
                top_p.to(logits.dtype) if use_top_p else None,
                candidates=int(sampled_k.max()) if sampled_k.size else vocab,
            )
        if (batch.column("min_p") > 0.0).any():
            scaled = apply_min_p(scaled, min_p.to(logits.dtype))

        probs = scaled.softmax(dim=-1)
        race = torch.ones_like(probs)
        for i in np.flatnonzero(sampled).tolist():
            race[i].exponential_(generator=self._generator(requests[i], device))
        # Exp(1) can round to 0; 0/0 would be NaN, which argmax would pick.
        race.clamp_(min=torch.finfo(race.dtype).tiny)
        drawn = (probs / race).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), drawn)

    def _generator(self, request: Request, device: torch.device) -> torch.Generator:
        """The request's random stream, created on first use from its seed (or, unseeded, from
        the sampler's `seed` option and the request's arrival number, so runs reproduce)."""
        gen = request.plugin_state.get(GENERATOR_KEY)
        if gen is None:
            seed = request.params.seed
            if seed is None:
                seed = (self.options.seed * _MIX + request.seq) % 2**64
            gen = torch.Generator(device=device)
            gen.manual_seed(seed)
            request.plugin_state[GENERATOR_KEY] = gen
        return gen


class _BatchFacts:
    """A batch's per-row sampling parameters, computed once per distinct batch from its
    `SamplingBatch` (numpy over the rows, no pass over the requests). It holds the request
    objects, so their ids cannot be reused by new requests while it is cached."""

    def __init__(
        self,
        requests: list[Request],
        vocab: int,
        sampler_seed: int,
        batch: SamplingBatch | None = None,
    ) -> None:
        self.requests, self.vocab, self.sampler_seed = requests, vocab, sampler_seed
        self.batch = batch = batch if batch is not None else sampling_of(requests)
        logprobs = batch.column("logprobs")
        self.want_logprobs: list[int] = np.flatnonzero(logprobs >= 0).tolist()
        self.num_top: list[int] = logprobs[self.want_logprobs].astype(np.int64).tolist()
        self.penalties = bool(_penalised(batch).any())
        temperature = batch.column("temperature")
        self.greedy = bool((temperature == 0.0).all())
        # Greedy batches draw nothing; otherwise the rows without top-k, top-p or min-p.
        self.plain: list[int] = (
            [] if self.greedy else np.flatnonzero(_unfiltered(batch, vocab)).tolist()
        )
        self.base_seeds = None if self.greedy else _base_seeds(batch, sampler_seed)
        #: The Gumbel kernel's splitmix64 states on the device and each row's tokens drawn
        #: when they were made (`StandardSampler._seed_state`).
        self.seed_states: torch.Tensor | None = None
        self.seed_drawn: np.ndarray | None = None
        self._temperature: torch.Tensor | None = None
        #: The Gumbel kernel's `1 / temperature` on the device (`gumbel.inverse_temperature`).
        self.inv_temperature: torch.Tensor | None = None
        self._split: _Split | None = None

    def temperature(self, device: torch.device) -> torch.Tensor:
        """The rows' temperatures on `device` (float32), copied there once."""
        if self._temperature is None or self._temperature.device != device:
            temps = self.batch.column("temperature").astype(np.float32)
            self._temperature = to_device(temps, device)
        return self._temperature

    def split(self, device: torch.device) -> _Split:
        """The batch cut into its plain rows and the others (`_Split`), made once per device."""
        if self._split is None or self._split.device != device:
            self._split = _Split(self, device)
        return self._split


class _Split:
    """A batch with both plain and filtered rows, cut in two: the plain rows' own
    `_BatchFacts` (so their temperatures and seed states stay on the device as a whole
    batch's do), the other rows' requests and parameters, and both parts' row indices on
    `device`. Kept by the batch's facts: a recurring mixed batch uploads none of it again."""

    def __init__(self, facts: _BatchFacts, device: torch.device) -> None:
        plain, requests = facts.plain, facts.requests
        plain_set = set(plain)
        rest = [i for i in range(len(requests)) if i not in plain_set]
        self.device = device
        self.plain = _BatchFacts(
            [requests[i] for i in plain], facts.vocab, facts.sampler_seed, facts.batch.take(plain)
        )
        self.rest_requests = [requests[i] for i in rest]
        self.rest_batch = facts.batch.take(rest)
        self.plain_rows = to_device(plain, device, torch.int64)
        self.rest_rows = to_device(rest, device, torch.int64)


def _base_seeds(batch: SamplingBatch, sampler_seed: int) -> np.ndarray:
    """Each row's seed, or (unseeded) one from the sampler's seed and its arrival number,
    `(sampler_seed * _MIX + seq) % 2**64` (uint64 arithmetic wraps modulo 2**64)."""
    mixed = np.uint64(sampler_seed * _MIX % 2**64)
    with np.errstate(over="ignore"):
        unseeded = mixed + batch.seqs.astype(np.uint64)
    return np.where(batch.column("seeded") != 0.0, batch.seeds, unseeded)


def _splitmix_states(base: np.ndarray, drawn: np.ndarray) -> np.ndarray:
    """uint64 splitmix64 states of each row's next draw, `base + (drawn + 1) * _MIX` (wrapping
    modulo 2**64): the state after `drawn` tokens, whose finalized output seeds the draw."""
    with np.errstate(over="ignore"):
        return base + (drawn + np.uint64(1)) * np.uint64(_MIX)


def _penalised(batch: SamplingBatch) -> np.ndarray:
    """Bool per row: it asks for a repetition, frequency or presence penalty."""
    return (
        (batch.column("repetition_penalty") != 1.0)
        | (batch.column("frequency_penalty") != 0.0)
        | (batch.column("presence_penalty") != 0.0)
    )


def _unfiltered(batch: SamplingBatch, vocab: int) -> np.ndarray:
    """Bool per row: it samples from the plain temperature softmax (no top-k, top-p or min-p)."""
    k = batch.column("top_k")
    return (
        ~((k > 0) & (k < vocab)) & (batch.column("top_p") >= 1.0) & (batch.column("min_p") <= 0.0)
    )


def _gumbel_available(device: torch.device) -> bool:
    """The Gumbel kernel serves CUDA devices with Triton installed (CPU rows keep the
    generator path; tests run the kernel itself under Triton's interpreter)."""
    return device.type == "cuda" and _triton_installed()


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first largest logit: on CUDA by the Gumbel module's noiseless kernel, which
    splits each row over many programs and reads at the memory's pace (torch's reduction did
    not: docs/kernels.md), else by torch."""
    if not _gumbel_available(logits.device):
        return logits.argmax(dim=-1)
    from pegboard.plugins.sampling.gumbel import argmax

    return argmax(logits)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def _logprobs(
    raw_logprobs: torch.Tensor, tokens: torch.Tensor, num_top: list[int]
) -> list[TokenLogprobs]:
    """The chosen tokens' logprobs and each row's `num_top` best alternatives, best first."""
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    top_values, top_ids = raw_logprobs.topk(max(num_top), dim=-1)
    top_values, top_ids = top_values.tolist(), top_ids.tolist()
    return [
        TokenLogprobs(
            token_id=token,
            logprob=chosen[row],
            top=list(zip(top_ids[row][:n], top_values[row][:n])),
        )
        for row, (token, n) in enumerate(zip(tokens.tolist(), num_top))
    ]
