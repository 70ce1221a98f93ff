"""`PageTableMirror`: the incrementally kept page-table array equals one built from scratch
whatever the KV cache does to the requests' lists (grow, reset, in-place swaps, shrink)."""

from __future__ import annotations

import random

import numpy as np
import pytest
from pegboard.core.page_tables import PageTableMirror
from pegboard.sdk.types import Request


def padded(tables: list[list[int]], num_pages: list[int]) -> np.ndarray:
    width = max(num_pages, default=0)
    out = np.zeros((len(tables), width), dtype=np.int32)
    for i, (t, n) in enumerate(zip(tables, num_pages)):
        out[i, :n] = t[:n]
    return out


@pytest.mark.parametrize("pages", ["some", "all", "all-array", "some-array-held"])
@pytest.mark.parametrize("same_batch", [False, True], ids=["random-batches", "decode-batches"])
@pytest.mark.parametrize("seed", range(5))
def test_gathered_rows_equal_a_fresh_build_under_random_edits(seed, same_batch, pages):
    """`pages`: each request's first few pages (rows cut short), or all its pages (a decode
    step's case: no row is zeroed by `gather`, so a reused or shrunk row must hold zeros past
    its pages already), as a list or as an array (the decode path's, with the lists' lengths
    or without)."""
    rng = random.Random(seed)
    mirror = PageTableMirror(rows=2, width=2)  # small: rows and columns must grow
    live = [Request([1]) for _ in range(6)]
    for r in live:
        r.page_table = [rng.randrange(1000) for _ in range(rng.randint(0, 5))]
    for _ in range(300):
        r = rng.choice(live)
        edit = rng.random()
        if edit < 0.4:  # decode crossed a page boundary / prefill chunk
            r.page_table.extend(rng.randrange(1000) for _ in range(rng.randint(1, 9)))
        elif edit < 0.5:  # preempted: pages freed
            r.page_table = []
        elif edit < 0.7 and r.page_table:  # a prefix cache swapped in an identical cached page
            r.page_table[rng.randrange(len(r.page_table))] = rng.randrange(1000)
        elif edit < 0.8 and r.page_table:  # speculative rollback: trailing pages dropped
            del r.page_table[rng.randrange(len(r.page_table)) :]
        elif edit < 0.9:  # released; a new request takes its place
            mirror.forget(r)
            live[live.index(r)] = new = Request([1])
            new.page_table = [rng.randrange(1000) for _ in range(rng.randint(0, 30))]
        # Decode steps gather the same requests in the same order (a new list each time).
        batch = list(live) if same_batch else rng.sample(live, rng.randint(1, len(live)))
        num_pages = [rng.randint(0, len(q.page_table)) for q in batch]
        if pages.startswith("all"):
            num_pages = [len(q.page_table) for q in batch]
        if pages == "all-array":
            got = mirror.gather(batch, np.asarray(num_pages))
        elif pages == "some-array-held":
            held = np.asarray([len(q.page_table) for q in batch])
            got = mirror.gather(batch, np.asarray(num_pages), held)
        else:
            got = mirror.gather(batch, num_pages)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, padded([q.page_table for q in batch], num_pages))


def test_rows_are_reused_after_forget():
    mirror = PageTableMirror(rows=4, width=4)
    first = [Request([1]) for _ in range(4)]
    for i, r in enumerate(first):
        r.page_table = [i]
    mirror.gather(first, [1] * 4)
    for r in first:
        mirror.forget(r)
    second = [Request([1]) for _ in range(4)]
    for i, r in enumerate(second):
        r.page_table = [10 + i, 20 + i]
    assert mirror.gather(second, [2] * 4).tolist() == [[10 + i, 20 + i] for i in range(4)]
    assert mirror.table.shape[0] == 4  # no growth: the freed rows were taken


def test_the_runner_hands_the_array_to_the_attention_backend(tiny_llama_dir):
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    with LLM(str(tiny_llama_dir), dtype="float32", device="cpu", page_size=4) as llm:
        seen = []
        prepare = llm.engine.runner.attention.prepare

        def spy(batch):
            seen.append((batch.page_tables_array, [list(t) for t in batch.page_tables_cpu]))
            return prepare(batch)

        llm.engine.runner.attention.prepare = spy
        llm.generate([[5] * 9, [6] * 3], SamplingParams(max_tokens=12, ignore_eos=True))
        assert not llm.engine.runner.page_tables._rows  # released requests gave their rows back
    assert len(seen) > 5
    for array, tables in seen:
        np.testing.assert_array_equal(array, padded(tables, [len(t) for t in tables]))


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "no-overlap"])
def test_decode_fast_path_builds_the_general_paths_batch(tiny_llama_dir, overlap):
    """`ModelRunner.prepare`'s decode-only path (no per-request loop) gives the same batch as
    the general loop, step after step, with pending tokens filled on the device or the host."""
    import torch
    from pegboard.core.llm import LLM
    from pegboard.sdk.types import SamplingParams

    with LLM(
        str(tiny_llama_dir), dtype="float32", device="cpu", page_size=4, disable_overlap=not overlap
    ) as llm:
        runner = llm.engine.runner
        prepare, fast = runner.prepare, runner._prepare_decode
        compared = []

        def both(requests, num_tokens, page_size, pending=None):
            got = prepare(requests, num_tokens, page_size, pending)
            if fast(requests, num_tokens, page_size, pending) is not None:
                runner._prepare_decode = lambda *a: None
                try:
                    want = prepare(requests, num_tokens, page_size, pending)
                finally:
                    runner._prepare_decode = fast
                for name in ("input_ids", "positions", "slot_mapping", "logits_indices"):
                    assert torch.equal(getattr(got, name), getattr(want, name)), name
                for name in ("query_lens_cpu", "seq_lens_cpu", "page_tables_cpu", "samples"):
                    assert getattr(got, name) == getattr(want, name), name
                np.testing.assert_array_equal(got.page_tables_array, want.page_tables_array)
                compared.append(len(requests))
            return got

        runner.prepare = both
        prompts = [[5 + i] * (3 + 2 * i) for i in range(5)]
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=9, ignore_eos=True))
    assert len(compared) > 5 and max(compared) == 5
