"""The reference paged attention backend against dense per-request attention."""

from __future__ import annotations

import math

import pytest
import torch
from pegboard.plugins.kernels.attention_torch import TorchAttention, TorchAttentionBackend
from pegboard.sdk.slots import AttentionBackend
from pegboard.sdk.types import ForwardBatch, KVPool, ModelInfo, Request

HEADS, KV_HEADS, HEAD_DIM, NUM_PAGES = 4, 2, 8, 64


def model_info(dtype: torch.dtype = torch.float32) -> ModelInfo:
    return ModelInfo("Test", 2, HEADS, KV_HEADS, HEAD_DIM, 32, 100, 256, dtype, torch.device("cpu"))


class Scenario:
    """Requests with a cached prefix already in the pool and some new tokens this step.

    Keeps every request's full K/V so the expected output can be computed densely."""

    def __init__(self, cached: list[int], new: list[int], page_size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.info = model_info()
        self.pool = KVPool.allocate(self.info, NUM_PAGES, page_size)
        free = torch.randperm(NUM_PAGES, generator=gen).tolist()  # scattered pages
        self.cached, self.new, self.page_size = cached, new, page_size
        self.keys, self.values, tables, slots = [], [], [], []
        for c, n in zip(cached, new):
            table = [free.pop() for _ in range(-(-(c + n) // page_size))]
            k = torch.randn(c + n, KV_HEADS, HEAD_DIM, generator=gen)
            v = torch.randn(c + n, KV_HEADS, HEAD_DIM, generator=gen)
            flat = [table[p // page_size] * page_size + p % page_size for p in range(c + n)]
            for layer in range(self.info.num_layers):
                self.pool.k[layer].view(-1, KV_HEADS, HEAD_DIM)[flat[:c]] = k[:c]
                self.pool.v[layer].view(-1, KV_HEADS, HEAD_DIM)[flat[:c]] = v[:c]
            self.keys.append(k)
            self.values.append(v)
            tables.append(table)
            slots += flat[c:]
        self.q = torch.randn(sum(new), HEADS, HEAD_DIM, generator=gen)
        ends = torch.tensor(new).cumsum(0) - 1
        self.batch = ForwardBatch(
            requests=[Request(prompt_token_ids=[1] * (c + n)) for c, n in zip(cached, new)],
            input_ids=torch.zeros(sum(new), dtype=torch.int64),
            positions=torch.cat([torch.arange(c, c + n) for c, n in zip(cached, new)]),
            slot_mapping=torch.tensor(slots, dtype=torch.int64),
            query_lens_cpu=list(new),
            seq_lens_cpu=[c + n for c, n in zip(cached, new)],
            page_tables_cpu=tables,
            logits_indices=ends,
            samples=[True] * len(new),
        )

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([k[c:] for k, c in zip(self.keys, self.cached)])
        v = torch.cat([v[c:] for v, c in zip(self.values, self.cached)])
        return k, v

    def expected(self) -> torch.Tensor:
        """Dense causal attention per request, GQA by repeating KV heads."""
        out, start = [], 0
        group = HEADS // KV_HEADS
        for k, v, c, n in zip(self.keys, self.values, self.cached, self.new):
            q = self.q[start : start + n].transpose(0, 1)  # [H, n, D]
            kk = k.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, c+n, D]
            vv = v.repeat_interleave(group, dim=1).transpose(0, 1)
            scores = q @ kk.transpose(1, 2) / math.sqrt(HEAD_DIM)
            allowed = torch.arange(c + n)[None, :] <= (c + torch.arange(n))[:, None]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out.append((scores.softmax(-1) @ vv).transpose(0, 1))
            start += n
        return torch.cat(out)

    def run(self, layer: int = 1) -> torch.Tensor:
        backend = TorchAttentionBackend(self.info, self.pool)
        backend.prepare(self.batch)
        k, v = self.new_kv()
        return backend.forward(layer, self.q, k, v)


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_mixed_prefill_cached_prefix_and_decode_match_dense_attention(page_size):
    scenario = Scenario(cached=[0, 7, 20, 5], new=[6, 4, 1, 1], page_size=page_size)
    torch.testing.assert_close(scenario.run(), scenario.expected(), atol=1e-5, rtol=1e-5)


def test_decode_only_batch_matches_dense_attention():
    scenario = Scenario(cached=[3, 40, 17], new=[1, 1, 1], page_size=16, seed=1)
    torch.testing.assert_close(scenario.run(), scenario.expected(), atol=1e-5, rtol=1e-5)


def test_new_keys_and_values_are_written_at_the_slot_mapping():
    scenario = Scenario(cached=[2, 0], new=[3, 5], page_size=4, seed=2)
    scenario.run(layer=1)
    k, v = scenario.new_kv()
    slots = scenario.batch.slot_mapping
    assert torch.equal(scenario.pool.k[1].view(-1, KV_HEADS, HEAD_DIM)[slots], k)
    assert torch.equal(scenario.pool.v[1].view(-1, KV_HEADS, HEAD_DIM)[slots], v)
    assert not scenario.pool.k[0].view(-1, KV_HEADS, HEAD_DIM)[slots].any()  # other layer untouched


def test_output_has_query_shape_and_no_nans_from_padding():
    scenario = Scenario(cached=[0, 0], new=[1, 9], page_size=2, seed=3)
    out = scenario.run()
    assert out.shape == (10, HEADS, HEAD_DIM)
    assert torch.isfinite(out).all()


def test_plugin_returns_a_backend_over_the_given_pool():
    info = model_info()
    pool = KVPool.allocate(info, 4, 16)
    backend = TorchAttention().attention_kernel(model=info, pool=pool)
    assert isinstance(backend, AttentionBackend)
    assert backend.pool is pool
    assert backend.scale == pytest.approx(HEAD_DIM**-0.5)
