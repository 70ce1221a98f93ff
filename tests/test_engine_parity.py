"""The correctness oracle (DESIGN.md §7): in float32 on CPU, pegboard's greedy output equals
transformers' `generate` token for token, and its logprobs match, whatever the batching."""

from __future__ import annotations

import random

import pytest
import torch
from pegboard.core.llm import LLM
from pegboard.sdk.types import SamplingParams

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]
NUM_PROMPTS = 16
MAX_NEW = 12


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    """Prompts of different lengths (3..40 tokens) of ordinary (non-special) token ids."""
    rng = random.Random(seed)
    return [
        [rng.randrange(8, vocab) for _ in range(rng.randint(3, 40))] for _ in range(NUM_PROMPTS)
    ]


def hf_reference(model_dir, prompts: list[list[int]], max_new: int):
    """Greedy continuations and per-step log-softmax from transformers, one prompt at a time."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    gen_cfg = GenerationConfig.from_pretrained(model_dir)
    out = []
    for ids in prompts:
        with torch.no_grad():
            res = model.generate(
                torch.tensor([ids]),
                attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                max_new_tokens=max_new,
                do_sample=False,
                eos_token_id=gen_cfg.eos_token_id,
                pad_token_id=gen_cfg.eos_token_id
                if gen_cfg.pad_token_id is None
                else gen_cfg.pad_token_id,
                output_logits=True,
                return_dict_in_generate=True,
            )
        tokens = res.sequences[0, len(ids) :].tolist()
        logprobs = [torch.log_softmax(step[0].float(), -1) for step in res.logits]
        out.append((tokens, logprobs))
    return out


@pytest.fixture(scope="module", params=ARCHS)
def arch_case(request, tiny_model_dirs):
    model_dir = tiny_model_dirs[request.param]
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(model_dir).vocab_size
    prompts = make_prompts(vocab)
    return model_dir, prompts, hf_reference(model_dir, prompts, MAX_NEW)


def run_pegboard(model_dir, prompts, logprobs=None, max_new=MAX_NEW, **settings):
    params = SamplingParams(max_tokens=max_new, temperature=0.0, logprobs=logprobs)
    with LLM(str(model_dir), dtype="float32", device="cpu", **settings) as llm:
        return llm.generate(prompts, params)


def assert_same_tokens(outs, reference):
    for i, (out, (ref_tokens, _)) in enumerate(zip(outs, reference)):
        assert out.token_ids == ref_tokens, f"prompt {i}: {out.token_ids} != {ref_tokens}"


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="default-budget"),
        pytest.param({"page_size": 1}, id="page-size-1"),
        pytest.param({"page_size": 16}, id="page-size-16"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
        pytest.param({"max_running_requests": 3}, id="request-cap"),
    ],
)
def test_greedy_equals_transformers(arch_case, settings):
    model_dir, prompts, reference = arch_case
    outs = run_pegboard(model_dir, prompts, **settings)
    assert_same_tokens(outs, reference)


def test_greedy_equals_transformers_under_preemption(arch_case):
    model_dir, prompts, reference = arch_case
    # 10 pages of 4 tokens: far less than 16 prompts need at once, so requests are preempted
    # and recomputed; every one must still finish with the reference output.
    outs = run_pegboard(model_dir, prompts, page_size=4, kv_cache_tokens=64)
    assert sum(o.num_preemptions for o in outs) > 0, "the KV cache was not small enough"
    assert_same_tokens(outs, reference)


def test_top_logprobs_match_transformers(arch_case):
    model_dir, prompts, reference = arch_case
    outs = run_pegboard(model_dir, prompts, logprobs=5, max_num_batched_tokens=32)
    for out, (ref_tokens, ref_logprobs) in zip(outs, reference):
        assert len(out.logprobs) == len(ref_tokens)
        for step, ref in zip(out.logprobs, ref_logprobs):
            assert step.logprob == pytest.approx(ref[step.token_id].item(), abs=1e-4)
            ref_top = torch.topk(ref, 5)
            assert [t for t, _ in step.top] == ref_top.indices.tolist()
            for (_, lp), ref_lp in zip(step.top, ref_top.values.tolist()):
                assert lp == pytest.approx(ref_lp, abs=1e-4)


@pytest.mark.slow
def test_bundled_smollm2_greedy_equals_transformers():
    """The real model: a handful of prompts, batched with chunked prefill, as transformers."""
    from pegboard.core.default_model import default_model_dir
    from pegboard.core.tokenizer import load_tokenizer

    model_dir = default_model_dir()
    tok = load_tokenizer(model_dir)
    texts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Once upon a time, in a small village,",
        "The three primary colors are",
    ]
    prompts = [tok.encode(t) for t in texts]
    prompts.append(tok.apply_chat_template([{"role": "user", "content": "Name a fruit."}]))
    # 8 new tokens (a step of the real model is slow on a busy CPU): chunked prefill (24 tokens
    # a step) still overlaps the first decodes.
    reference = hf_reference(model_dir, prompts, 8)
    outs = run_pegboard(model_dir, prompts, logprobs=1, max_new=8, max_num_batched_tokens=24)
    assert_same_tokens(outs, reference)
    assert "Paris" in outs[0].text
    for out, (_, ref_logprobs) in zip(outs, reference):
        for step, ref in zip(out.logprobs, ref_logprobs):
            assert step.logprob == pytest.approx(ref[step.token_id].item(), abs=1e-4)
