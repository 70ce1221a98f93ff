"""Our decoder on a paged KV cache reproduces transformers' logits (float32, CPU): batched
prefill of prompts of different lengths, decode steps, chunked prefill, any page size."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
import torch
from fixtures import ARCHS, PageAllocator, build_tiny_model
from pegboard.core.model_runner import ModelRunner
from pegboard.plugins.kernels.attention_torch import TorchAttentionBackend
from pegboard.sdk.types import KVPool, Request

ATOL = 1e-4
NUM_PAGES = 512


def make_runner(model_dir: Path, page_size: int, **kwargs) -> tuple[ModelRunner, PageAllocator]:
    kwargs = {"dtype": "float32", "device": "cpu", **kwargs}
    runner = ModelRunner(model_dir, progress=False, **kwargs)
    pool = KVPool.allocate(runner.info, NUM_PAGES, page_size)
    runner.set_attention(TorchAttentionBackend(runner.info, pool))
    return runner, PageAllocator(NUM_PAGES, page_size)


def run_step(
    runner: ModelRunner, alloc: PageAllocator, plan: list[tuple[Request, int]]
) -> torch.Tensor:
    """One engine step as the engine does it: grow page tables, prepare, forward, advance."""
    for request, n in plan:
        alloc.grow(request, n)
    batch = runner.prepare([r for r, _ in plan], [n for _, n in plan], alloc.page_size)
    logits = runner.forward(batch)
    for request, n in plan:
        request.num_computed_tokens += n
    return logits


def hf_logits(model_dir: Path, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Teacher-forced transformers logits `[len, vocab]` of each full sequence."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(torch.tensor([seq])).logits[0].float() for seq in sequences]


def random_sequences(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(8, 512) for _ in range(n)] for n in lengths]


@pytest.fixture(scope="module", params=ARCHS)
def arch_reference(request, tiny_model_dirs):
    """(model dir, prompt lengths, full sequences, HF logits) for one architecture."""
    model_dir = tiny_model_dirs[request.param]
    prompt_lens, decode_steps = [5, 17, 33, 1], 6
    sequences = random_sequences([n + decode_steps for n in prompt_lens], seed=1)
    return model_dir, prompt_lens, sequences, hf_logits(model_dir, sequences)


@pytest.mark.parametrize("page_size", [1, 16])
def test_batched_prefill_then_decode_matches_transformers(arch_reference, page_size):
    model_dir, prompt_lens, sequences, reference = arch_reference
    runner, alloc = make_runner(model_dir, page_size)
    requests = [Request(prompt_token_ids=seq[:n]) for seq, n in zip(sequences, prompt_lens)]

    logits = run_step(runner, alloc, [(r, r.num_tokens) for r in requests])
    for i, n in enumerate(prompt_lens):
        torch.testing.assert_close(logits[i], reference[i][n - 1], atol=ATOL, rtol=0)

    for step in range(len(sequences[0]) - prompt_lens[0] - 1):
        for r, seq in zip(requests, sequences):
            r.append_token(seq[r.num_tokens])  # teacher forcing: feed the reference sequence
        logits = run_step(runner, alloc, [(r, 1) for r in requests])
        for i, n in enumerate(prompt_lens):
            torch.testing.assert_close(logits[i], reference[i][n + step], atol=ATOL, rtol=0)


def test_chunked_prefill_across_steps_matches_transformers(arch_reference):
    model_dir, prompt_lens, sequences, reference = arch_reference
    runner, alloc = make_runner(model_dir, page_size=4)
    long_prompt = Request(prompt_token_ids=sequences[2][:33])
    decoder = Request(prompt_token_ids=sequences[1][:17])
    run_step(runner, alloc, [(decoder, decoder.num_tokens)])

    for chunk in (10, 13):  # two non-final chunks run alongside a decoding request
        decoder.append_token(sequences[1][decoder.num_tokens])
        logits = run_step(runner, alloc, [(long_prompt, chunk), (decoder, 1)])
        assert logits.shape == (1, runner.info.vocab_size)  # only the decoder samples
        torch.testing.assert_close(
            logits[0], reference[1][decoder.num_tokens - 1], atol=ATOL, rtol=0
        )
    logits = run_step(runner, alloc, [(long_prompt, 10)])
    torch.testing.assert_close(logits[0], reference[2][32], atol=ATOL, rtol=0)


def test_forward_returns_model_dtype_rows_for_sampling_requests_only(tiny_llama_dir):
    # the LM head's own dtype: the engine converts for a sampler that wants float32
    # (tests/test_logits_dtype.py), the standard sampler takes them as they are
    runner, alloc = make_runner(tiny_llama_dir, page_size=16, dtype="bfloat16")
    a, b = (Request(prompt_token_ids=s) for s in random_sequences([9, 4], seed=2))
    logits = run_step(runner, alloc, [(a, 5), (b, 4)])
    assert logits.dtype == torch.bfloat16
    assert logits.shape == (1, runner.info.vocab_size)


def test_prepare_lays_out_tokens_positions_and_slots(tiny_llama_dir):
    runner, _ = make_runner(tiny_llama_dir, page_size=4)
    a = Request(prompt_token_ids=list(range(10, 20)))
    a.num_computed_tokens, a.page_table = 6, [7, 3, 5]
    b = Request(prompt_token_ids=[42, 43])
    b.page_table = [0]
    batch = runner.prepare([a, b], [3, 2], page_size=4)
    assert batch.input_ids.tolist() == [16, 17, 18, 42, 43]
    assert batch.positions.tolist() == [6, 7, 8, 0, 1]
    # token 6 -> page_table[1]=3, offset 2; token 8 -> page_table[2]=5, offset 0
    assert batch.slot_mapping.tolist() == [14, 15, 20, 0, 1]
    assert batch.query_lens_cpu == [3, 2]
    assert batch.seq_lens_cpu == [9, 2]
    assert batch.page_tables_cpu == [[7, 3, 5], [0]]
    assert batch.logits_indices.tolist() == [2, 4]
    assert batch.samples == [False, True]
    assert a.num_computed_tokens == 6  # the engine advances it, not the runner


def test_prepare_lays_out_a_mixed_step_with_decode_rows_between_prefill_chunks(tiny_llama_dir):
    """The general path's whole-list passes: a decode row between two prefill chunks, a page
    table longer than the step needs (cut in `page_tables_cpu`, zeros past it in the array)."""
    runner, _ = make_runner(tiny_llama_dir, page_size=4)
    a = Request(prompt_token_ids=list(range(100, 120)))
    a.num_computed_tokens, a.page_table = 4, [9, 2, 6, 1, 8]  # tokens 4..9: pages 2, 6
    d = Request(prompt_token_ids=[5, 6, 7, 8, 9, 10])
    d.num_computed_tokens, d.page_table = 5, [4, 11]  # token 5: page 11, offset 1
    c = Request(prompt_token_ids=[31, 32, 33])
    c.page_table = [3]
    batch = runner.prepare([a, d, c], [6, 1, 3], page_size=4)
    assert batch.input_ids.tolist() == [104, 105, 106, 107, 108, 109, 10, 31, 32, 33]
    assert batch.positions.tolist() == [4, 5, 6, 7, 8, 9, 5, 0, 1, 2]
    assert batch.slot_mapping.tolist() == [8, 9, 10, 11, 24, 25, 45, 12, 13, 14]
    assert batch.query_lens_cpu == [6, 1, 3] and batch.seq_lens_cpu == [10, 6, 3]
    assert batch.page_tables_cpu == [[9, 2, 6], [4, 11], [3]]
    assert batch.page_tables_array.tolist() == [[9, 2, 6], [4, 11, 0], [3, 0, 0]]
    assert batch.logits_indices.tolist() == [5, 6, 9]
    assert batch.samples == [False, True, True]


def test_prepare_rejects_more_tokens_than_a_request_has(tiny_llama_dir):
    runner, _ = make_runner(tiny_llama_dir, page_size=4)
    ok, r = Request(prompt_token_ids=[1, 2]), Request(prompt_token_ids=[1, 2, 3])
    ok.page_table, r.page_table = [0], [1]
    with pytest.raises(ValueError, match=f"request {r.request_id}: cannot run 4 tokens from 0"):
        runner.prepare([ok, r], [2, 4], page_size=4)


def test_prepare_rejects_a_page_table_too_short(tiny_llama_dir):
    runner, _ = make_runner(tiny_llama_dir, page_size=4)
    r = Request(prompt_token_ids=list(range(10, 19)))
    r.page_table = [0, 1]
    with pytest.raises(ValueError, match="3 are needed"):
        runner.prepare([r], [9], page_size=4)


def test_tied_embeddings_share_one_tensor(tiny_qwen2_dir, tiny_llama_dir):
    tied, _ = make_runner(tiny_qwen2_dir, page_size=16)
    untied, _ = make_runner(tiny_llama_dir, page_size=16)
    assert tied.model.lm_head.weight is tied.model.model.embed_tokens.weight
    assert untied.model.lm_head.weight is not untied.model.model.embed_tokens.weight


def test_max_model_len_is_min_of_config_and_request(tiny_llama_dir):
    assert make_runner(tiny_llama_dir, 16)[0].info.max_model_len == 512
    assert make_runner(tiny_llama_dir, 16, max_model_len=100)[0].info.max_model_len == 100
    assert make_runner(tiny_llama_dir, 16, max_model_len=4096)[0].info.max_model_len == 512


def test_sliding_window_caps_max_model_len_with_warning(tiny_mistral_dir, caplog):
    runner, _ = make_runner(tiny_mistral_dir, 16)
    assert runner.info.max_model_len == 256
    assert "sliding-window" in caplog.text


def test_auto_dtype_is_float32_on_cpu_and_bfloat16_loads(tiny_qwen3_dir):
    auto, _ = make_runner(tiny_qwen3_dir, 16, dtype="auto")
    assert auto.info.dtype == torch.float32
    assert auto.model.model.embed_tokens.weight.dtype == torch.float32
    bf16, _ = make_runner(tiny_qwen3_dir, 16, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model.model.rotary_emb.cos.dtype == torch.float32  # rope tables stay float32


def test_bfloat16_logits_stay_close_to_float32(tiny_llama_dir):
    seq = random_sequences([20], seed=3)[0]
    results = []
    for dtype in ("float32", "bfloat16"):
        runner, alloc = make_runner(tiny_llama_dir, 16, dtype=dtype)
        results.append(run_step(runner, alloc, [(Request(prompt_token_ids=seq), 20)])[0])
    assert (results[0] - results[1]).abs().max() < 0.05 * results[0].abs().max()


def test_sharded_checkpoint_loads_like_the_single_file(tmp_path, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_llama_dir, sharded)
    (sharded / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    model.save_pretrained(sharded, max_shard_size="50KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    seq = random_sequences([12], seed=4)[0]
    outputs = []
    for model_dir in (tiny_llama_dir, sharded):
        runner, alloc = make_runner(model_dir, 16)
        outputs.append(run_step(runner, alloc, [(Request(prompt_token_ids=seq), 12)]))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)


def test_linear_rope_scaling_matches_transformers(tmp_path):
    scaling = {"rope_type": "linear", "factor": 4.0}
    model_dir = build_tiny_model(tmp_path / "linear", "llama", rope_scaling=scaling)
    seq = random_sequences([40], seed=5)[0]
    runner, alloc = make_runner(model_dir, 16)
    logits = run_step(runner, alloc, [(Request(prompt_token_ids=seq), 40)])
    torch.testing.assert_close(logits[0], hf_logits(model_dir, [seq])[0][-1], atol=ATOL, rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_logits_match_cpu_float32(tiny_model_dirs, arch):
    model_dir = tiny_model_dirs[arch]
    prompts = random_sequences([7, 30, 2], seed=6)
    cpu, cpu_alloc = make_runner(model_dir, 16)
    reference = run_step(cpu, cpu_alloc, [(Request(prompt_token_ids=p), len(p)) for p in prompts])
    for dtype, atol in (("float32", 1e-3), ("bfloat16", 0.1)):
        runner, alloc = make_runner(model_dir, 16, device="cuda", dtype=dtype)
        assert runner.model.lm_head.weight.device.type == "cuda"
        requests = [Request(prompt_token_ids=p) for p in prompts]
        logits = run_step(runner, alloc, [(r, r.num_tokens) for r in requests])
        assert logits.device.type == "cuda"
        scale = reference.abs().max()
        assert (logits.cpu() - reference).abs().max() < atol * scale, dtype
