"""Every launch variant of the paged decode kernel (`DECODE_VARIANTS`) against a plain torch
computation: grid orders, tiles, KV heads per program, page prefetch, split schemes, FP8.

Without a GPU the kernel runs in Triton's CPU interpreter (tiny shapes); the `gpu` test runs
every variant compiled on realistic shapes.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]')")

from fixtures.decode_variants import interpreted  # noqa: E402
from pegboard.plugins.kernels.triton_attention import decode as decode_module  # noqa: E402
from pegboard.plugins.kernels.triton_attention.decode import (  # noqa: E402
    choose_num_splits,
    decode_attention,
)
from pegboard.plugins.kernels.triton_attention.decode_configs import (  # noqa: E402
    DECODE_DEFAULTS,
    DECODE_VARIANTS,
    DecodeConfig,
    decode_config,
    heads_per_program,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FP8 = torch.float8_e4m3fn


def paged_case(seq_lens, heads, kv_heads, head_dim, page_size, dtype, kv_dtype, seed=0):
    """q, a KV pool with every request's pages scattered over it (stale data elsewhere), the
    padded page table and the lengths."""
    gen = torch.Generator().manual_seed(seed)
    pages_per = [-(-s // page_size) for s in seq_lens]
    num_pages = sum(pages_per) + 5
    order = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.zeros(len(seq_lens), max(max(pages_per), 1), dtype=torch.int32)
    for i, n in enumerate(pages_per):
        table[i, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    shape = (num_pages, page_size, kv_heads, head_dim)
    k = torch.randn(shape, generator=gen).to(kv_dtype)
    v = torch.randn(shape, generator=gen).to(kv_dtype)
    q = torch.randn(len(seq_lens), heads, head_dim, generator=gen).to(dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32)
    return [t.to(DEVICE) for t in (q, k, v, table, lens)]


def reference(q, k_cache, v_cache, table, seq_lens, scale):
    """float32 attention of each request's query over its pages' first `seq_len` keys."""
    page_size, kv_heads = k_cache.shape[1], k_cache.shape[2]
    group = q.shape[1] // kv_heads
    out = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
    for i, n in enumerate(seq_lens.tolist()):
        if n == 0:
            continue
        pages = table[i, : -(-n // page_size)].long()
        k = k_cache[pages].float().reshape(-1, kv_heads, k_cache.shape[3])[:n]
        v = v_cache[pages].float().reshape(-1, kv_heads, v_cache.shape[3])[:n]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # [n, heads, d]
        logits = torch.einsum("hd,nhd->hn", q[i].float(), k) * scale
        out[i] = torch.einsum("hn,nhd->hd", logits.softmax(-1), v)
    return out


def check(config, seq_lens, num_splits, heads=4, kv_heads=2, head_dim=16, page_size=4,
          dtype=torch.float32, kv_dtype=None, atol=1e-4, **kw):  # fmt: skip
    q, k, v, table, lens = paged_case(
        seq_lens, heads, kv_heads, head_dim, page_size, dtype, kv_dtype or dtype
    )
    scale = head_dim**-0.5
    out = torch.full_like(q, float("nan"))
    decode_attention(q, k, v, table, lens, scale, out, num_splits=num_splits, config=config, **kw)
    want = reference(q, k, v, table, lens, scale)
    has_keys = lens > 0  # a row without keys (a padded CUDA-graph row) is left to the kernel
    torch.testing.assert_close(out[has_keys].float(), want[has_keys], atol=atol, rtol=0)


# Uneven lengths: one past several tiles and splits, one shorter than a page, a padded row of
# length 0, one ending mid-page.
LENS = [100, 3, 0, 37]


# (without a GPU one variant per distinct interpreted kernel: `fixtures/decode_variants.py`)
@pytest.mark.parametrize("name", interpreted(DECODE_VARIANTS, fp8_cache=False))
def test_every_variant_matches_the_reference_unsplit_and_split(name):
    check(name, LENS, 1)
    check(name, LENS, 3)


@pytest.mark.parametrize(
    "name",
    ["baseline", "s3-fast-pf-chunk", "hp2-s3-fast-pf", "hpall-bn16-w8-chunk", "bn128-w8-s3-pf"],
)
def test_variants_read_an_fp8_cache(name):
    """e4m3 keys and values converted in registers, float16 queries (float16 dots)."""
    check(name, LENS, 2, dtype=torch.float16, kv_dtype=FP8, atol=2e-2)


def test_f16_dot_variant_reads_an_fp8_cache_under_bf16_queries():
    """The variant's float16 dots (bf16 queries converted; the interpreter's bf16 dots are
    wrong, so the variant's own choice is what makes this pass)."""
    check("s3-fast-pf-f16", LENS, 2, dtype=torch.bfloat16, kv_dtype=FP8, atol=2e-2)


@pytest.mark.parametrize("name", ["s3-fast-pf-cvt", "s3-w8-fast-pf-cvt"])
def test_early_conversion_variants_read_an_fp8_cache_under_bf16_queries(name):
    """The `asm_cvt` variants convert each tile to float16 after its load (the interpreter:
    the plain cast, the PTX runs in the `gpu` tests); on the GPU they get the inline PTX, and
    only over an FP8 cache with float16 dots."""
    check(name, LENS, 1, dtype=torch.bfloat16, kv_dtype=FP8, atol=2e-2)
    check(name, LENS, 2, dtype=torch.bfloat16, kv_dtype=FP8, atol=2e-2)
    meta = decode_module.decode_meta
    config = DECODE_VARIANTS[name]
    assert meta(config, torch.bfloat16, FP8, 2, 8, 128, 16, False)["CVT"] == (
        1 if decode_module._INTERPRET else 2
    )
    assert meta(config, torch.bfloat16, torch.bfloat16, 2, 8, 128, 16, False)["CVT"] == 0
    assert (
        meta(DECODE_VARIANTS["s3-fast-pf-f16"], torch.bfloat16, FP8, 2, 8, 128, 16, False)["CVT"]
        == 0
    )


def test_fp8_cuda_core_variant_serves_one_kv_head_per_program():
    check("hpall-bn16-w4", LENS, 2, dtype=torch.float16, kv_dtype=FP8, atol=2e-2, fma=True)


@pytest.mark.parametrize("name", ["baseline", "hpall-bn16-w4", "s3-fast-pf-chunk"])
def test_group_of_three_and_head_dim_24(name):
    """Padded query rows (group 3), masked lanes (head size 24 in 32 columns per head)."""
    check(name, [41, 7, 90], 2, heads=6, kv_heads=2, head_dim=24)


def test_multi_head_attention_without_grouping_and_four_heads_per_program():
    check("hpall-bn16-w4", [20, 33], 1, heads=4, kv_heads=4)
    check("hp4-bn32-w8", [20, 33], 2, heads=8, kv_heads=4)


def test_heads_per_program_is_a_power_of_two_dividing_the_kv_heads():
    wide = DecodeConfig(heads_per_program=0)
    assert heads_per_program(wide, 8, 128) == 8
    assert heads_per_program(wide, 6, 128) == 2  # 6 -> 4 -> 2 (4 does not divide 6)
    assert heads_per_program(wide, 8, 256) == 4  # rows of at most 1024 elements
    assert heads_per_program(DecodeConfig(heads_per_program=3), 8, 128) == 2
    assert heads_per_program(DecodeConfig(), 8, 128) == 1


def test_defaults_name_variants_and_cover_every_batch_size():
    assert all(name in DECODE_VARIANTS for _, name in DECODE_DEFAULTS)
    for n in (1, 2, 31, 32, 64, 256, 4096):
        assert decode_config(n) in DECODE_VARIANTS.values()
    with pytest.raises(ValueError, match="multiple of 64"):
        DecodeConfig(min_chunk=100)


@pytest.mark.parametrize("max_seq_len", [1, 100, 1000, 40960])
@pytest.mark.parametrize("kv_heads", [1, 8, 32])
def test_no_batch_gets_more_splits_than_one_request(monkeypatch, max_seq_len, kv_heads):
    """CUDA graphs size the split workspace from a batch of one request (the backend's
    `prepare_for_capture`): whatever variant a larger batch runs, it must not need more."""
    monkeypatch.setattr(decode_module, "num_sms", lambda device: 132)
    one = choose_num_splits(1, kv_heads, max_seq_len, DEVICE)
    for n in (2, 8, 31, 32, 64, 256, 1024):
        assert 1 <= choose_num_splits(n, kv_heads, max_seq_len, DEVICE) <= one


def test_chunked_splits_do_not_depend_on_the_batch():
    """A `min_chunk` variant splits by length even when the batch alone fills the GPU."""
    chunk = DecodeConfig(min_chunk=256, split_cap=4)
    assert choose_num_splits(256, 8, 1000, DEVICE, config=chunk) == 4
    assert choose_num_splits(256, 8, 300, DEVICE, config=chunk) == 2
    assert choose_num_splits(256, 8, 300, DEVICE, config=DecodeConfig()) == 1


# ------------------------------------------------------------------ GPU, realistic shapes


NEEDS_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ENGINE_VARIANTS = list(dict.fromkeys(["baseline", *(name for _, name in DECODE_DEFAULTS)]))


def qwen_lens(n: int = 48) -> list[int]:
    return torch.randint(100, 1100, (n,), generator=torch.Generator().manual_seed(1)).tolist()


@pytest.mark.gpu
@pytest.mark.slow
@NEEDS_CUDA
@pytest.mark.parametrize("name", list(DECODE_VARIANTS))
def test_gpu_every_variant_matches_the_reference(name):
    """Qwen3-0.6B's heads (16 / 8, group 2, head size 128, page 16) over uneven lengths in 3
    splits, bf16 and e4m3 caches (the unsplit store: the engine variants' test below, and
    `bash scripts/device-run.sh decode-sweep`, which checks every variant's error)."""
    for kv_dtype in (torch.bfloat16, FP8):
        # `fp8_mma` over FP8: e4m3 queries and probabilities (tests/test_decode_fp8mma.py)
        e4m3_dots = DECODE_VARIANTS[name].fp8_mma and kv_dtype is FP8
        check(name, qwen_lens(), 3, heads=16, kv_heads=8, head_dim=128, page_size=16,
              dtype=torch.bfloat16, kv_dtype=kv_dtype, atol=0.12 if e4m3_dots else 2e-2)  # fmt: skip


@pytest.mark.gpu
@NEEDS_CUDA
@pytest.mark.parametrize("name", ENGINE_VARIANTS)
def test_gpu_engine_variants_match_the_reference_unsplit_and_at_batch_one(name):
    """The variants the engine runs: the nano-vllm batch unsplit (256 requests) and
    Llama-3.1-8B (32 / 8 heads) at batch 1 over 4096 keys with a batch of one's splits."""
    splits = choose_num_splits(1, 8, 4096, DEVICE, config=DECODE_VARIANTS[name])
    for kv_dtype in (torch.bfloat16, FP8):
        common = {"kv_heads": 8, "head_dim": 128, "page_size": 16, "dtype": torch.bfloat16,
                  "kv_dtype": kv_dtype, "atol": 2e-2}  # fmt: skip
        check(name, qwen_lens(256), 1, heads=16, **common)
        check(name, [4096], splits, heads=32, **common)
