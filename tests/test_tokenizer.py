"""The tokenizer wrapper: encoding, decoding, stop ids and chat formatting from a local dir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from fixtures import BOS_ID, EOS_ID, IM_END_ID, IM_START_ID, VOCAB_SIZE
from pegboard.core.tokenizer import TokenizerError, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return load_tokenizer(tiny_llama_dir)


def test_encode_adds_bos_unless_asked_not_to(tokenizer):
    with_bos = tokenizer.encode("Hello world")
    without = tokenizer.encode("Hello world", add_special_tokens=False)
    assert with_bos == [BOS_ID, *without]


def test_decode_round_trips_text_and_skips_special_tokens(tokenizer):
    text = "The quick brown fox, 12 dates: 2024!"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=False) == "<s>" + text


def test_eos_ids_join_tokenizer_and_generation_config(tokenizer):
    # tokenizer eos is </s>; generation_config.json lists [</s>, <|im_end|>]
    assert tokenizer.eos_token_ids == frozenset({EOS_ID, IM_END_ID})


def test_eos_ids_with_a_scalar_generation_config(tmp_path, tiny_llama_dir):
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "m"))
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(model_dir).eos_token_ids == frozenset({EOS_ID, 7})


def test_vocab_size_and_underlying_tokenizer(tokenizer):
    assert tokenizer.vocab_size == VOCAB_SIZE
    assert tokenizer.hf.convert_ids_to_tokens(IM_START_ID) == "<|im_start|>"


def test_chat_template_renders_turns_and_generation_prompt(tokenizer):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = tokenizer.apply_chat_template(messages)
    assert ids[0] == IM_START_ID
    assert ids.count(IM_START_ID) == 2  # the user turn and the assistant prompt
    assert tokenizer.decode(ids, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    closed = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
    assert closed.count(IM_START_ID) == 1


def test_missing_chat_template_is_a_clear_error(tmp_path, tiny_llama_dir):
    model_dir = Path(shutil.copytree(tiny_llama_dir, tmp_path / "m"))
    (model_dir / "chat_template.jinja").unlink()
    config_path = model_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    with pytest.raises(TokenizerError, match="no chat template"):
        load_tokenizer(model_dir).apply_chat_template([{"role": "user", "content": "Hi"}])


def test_directory_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="cannot load a tokenizer"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("skip", [True, False])
def test_fast_decode_equals_transformers_decode(tokenizer, skip):
    """`decode` goes to the Rust tokenizer directly; it must say what transformers says, for
    any ids (partial UTF-8 sequences, special tokens, added tokens)."""
    import random

    assert tokenizer._backend_decode is not None  # the fast path is the one under test
    rng = random.Random(0)
    for _ in range(300):
        ids = [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(0, 12))]
        assert tokenizer.decode(ids, skip) == tokenizer.hf.decode(ids, skip_special_tokens=skip)


def test_tokenizers_that_clean_up_spaces_keep_transformers_decode(tmp_path, tiny_llama_dir):
    for f in tiny_llama_dir.iterdir():
        shutil.copy(f, tmp_path / f.name)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["clean_up_tokenization_spaces"] = True
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path)._backend_decode is None
