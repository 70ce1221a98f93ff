"""Incremental detokenization: equals a full decode, holds back partial characters, stops on
stop strings across token boundaries."""

from __future__ import annotations

import functools
import random

import pytest
from pegboard.core.detokenizer import Detokenizer
from pegboard.sdk.types import SamplingParams
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! Stop here. The end is near, STOP now.",
    "東京は日本の首都です。北京は中国の首都です。",
    "Emoji are fun 🎉🚀🙂 and so is café au lait, naïve façade.",
    "Größe, Übermaß, ß and ñ: ¿qué tal? Ελληνικά και русский текст.",
]
EOS = "</s>"


class WrappedTokenizer:
    """The two things the Detokenizer uses of pegboard's tokenizer wrapper."""

    def __init__(self, hf: PreTrainedTokenizerFast) -> None:
        self.hf = hf

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False)


@functools.lru_cache(maxsize=1)
def tokenizer() -> WrappedTokenizer:
    """A tiny byte-level BPE: non-ASCII characters split over several byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 3, trainer=trainer)
    return WrappedTokenizer(PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS))


def stream(ids: list[int], params: SamplingParams, prompt: list[int] = (), chunk: int = 1):
    """Feed `ids` `chunk` at a time; return the detokenizer and the emitted pieces."""
    detok = Detokenizer(tokenizer(), params, list(prompt))
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    pieces.append(detok.flush())
    return detok, pieces


def test_tokenizer_splits_multibyte_characters_over_tokens():
    tok = tokenizer()
    ids = tok.encode("🎉🚀")
    assert len(ids) > 2
    assert tok.decode(ids[:1]).endswith("\ufffd")


@pytest.mark.parametrize("seed", range(30))
def test_incremental_text_equals_full_decode_of_random_tokens(seed):
    rng = random.Random(seed)
    vocab = len(tokenizer().hf)
    ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
    prompt = tokenizer().encode(rng.choice(_CORPUS))
    _, pieces = stream(ids, SamplingParams(), prompt, chunk=rng.choice([1, 1, 2, 3]))
    assert "".join(pieces) == tokenizer().decode(ids)


@pytest.mark.parametrize("text", _CORPUS)
def test_incremental_text_equals_full_decode_of_real_text(text):
    ids = tokenizer().encode(text)
    detok, pieces = stream(ids, SamplingParams())
    assert "".join(pieces) == text
    assert detok.text == text


def test_partial_utf8_is_held_back_until_the_character_completes():
    ids = tokenizer().encode("🚀")
    detok = Detokenizer(tokenizer(), SamplingParams(), [])
    assert [detok.add([t]) for t in ids[:-1]] == [""] * (len(ids) - 1)
    assert detok.add(ids[-1:]) == "🚀"
    assert "\ufffd" not in detok.text


def test_emitted_pieces_never_end_in_a_replacement_character():
    ids = tokenizer().encode(_CORPUS[2] + _CORPUS[3])
    _, pieces = stream(ids, SamplingParams())
    assert all(not p.endswith("\ufffd") for p in pieces)


def test_special_tokens_are_skipped_or_kept_as_asked():
    tok = tokenizer()
    eos = tok.hf.convert_tokens_to_ids(EOS)
    ids = tok.encode("Hello") + [eos] + tok.encode(" world")
    _, skipped = stream(ids, SamplingParams(skip_special_tokens=True))
    _, kept = stream(ids, SamplingParams(skip_special_tokens=False))
    assert "".join(skipped) == "Hello world"
    assert "".join(kept) == "Hello</s> world"


def test_prompt_is_context_only_and_never_emitted():
    prompt = tokenizer().encode("The end is near, ")
    ids = tokenizer().encode("STOP now.")
    detok, pieces = stream(ids, SamplingParams(stop=["near"]), prompt)
    assert "".join(pieces) == "STOP now."
    assert detok.stop_reason is None


def test_prompt_ending_inside_a_character_does_not_shift_the_output_text():
    rocket = tokenizer().encode("🚀")
    ids = rocket[1:] + tokenizer().encode(" fun")
    _, pieces = stream(ids, SamplingParams(), prompt=tokenizer().encode("so") + rocket[:1])
    assert "".join(pieces) == tokenizer().decode(ids)


def _stop_case(text: str, stop: list[str], chunk: int = 1):
    ids = tokenizer().encode(text)
    return stream(ids, SamplingParams(stop=stop), chunk=chunk)


def test_stop_string_spanning_several_tokens_truncates_before_it():
    stop = "STOP now"
    ids = tokenizer().encode("The end is near, STOP now.")
    assert len(tokenizer().encode(stop)) >= 2
    detok, pieces = stream(ids, SamplingParams(stop=[stop]))
    assert "".join(pieces) == "The end is near, "
    assert detok.text == "The end is near, "
    assert detok.stop_reason == stop


def test_stop_string_split_inside_tokens_is_found():
    # "nd is ne" starts and ends in the middle of tokens.
    detok, pieces = _stop_case("The end is near, STOP now.", ["nd is ne"])
    assert "".join(pieces) == "The e"
    assert detok.stop_reason == "nd is ne"


def test_stop_string_at_the_very_start_emits_nothing():
    detok, pieces = _stop_case("Hello world!", ["Hello"])
    assert pieces == [""] * len(pieces)
    assert detok.stop_reason == "Hello"


def test_every_call_after_a_stop_returns_nothing():
    detok = Detokenizer(tokenizer(), SamplingParams(stop=["world"]), [])
    assert detok.add(tokenizer().encode("Hello world")) == "Hello "
    assert detok.add(tokenizer().encode(" more text")) == ""
    assert detok.flush() == ""
    assert detok.text == "Hello "


def test_partial_match_that_is_not_a_stop_is_released():
    detok = Detokenizer(tokenizer(), SamplingParams(stop=["STOP now"]), [])
    emitted = [detok.add([t]) for t in tokenizer().encode("STOP here")]
    # "STOP" was held while it could still become "STOP now".
    assert "".join(emitted) + detok.flush() == "STOP here"
    assert detok.stop_reason is None
    held = Detokenizer(tokenizer(), SamplingParams(stop=["STOP now"]), [])
    assert held.add(tokenizer().encode("say STOP")) == "say "
    assert held.flush() == "STOP"


def test_earliest_stop_string_wins():
    detok, pieces = _stop_case("Hello world! Stop here.", ["here", "world", "Stop"], chunk=100)
    assert "".join(pieces) == "Hello "
    assert detok.stop_reason == "world"


def test_stop_that_completes_first_wins_whatever_the_chunking():
    for chunk in (1, 2, 100):
        detok, pieces = _stop_case("The quick brown fox", ["quick brown fox", "brown"], chunk)
        assert detok.stop_reason == "brown"
        assert "".join(pieces) == "The quick "


@pytest.mark.parametrize("seed", range(20))
def test_random_output_with_stop_strings_equals_truncated_full_decode(seed):
    rng = random.Random(seed)
    text = rng.choice(_CORPUS)
    ids = tokenizer().encode(text)
    full = tokenizer().decode(ids)
    start = rng.randrange(len(full) - 3)
    stop = full[start : start + rng.randrange(1, 4)]
    detok, pieces = stream(
        ids, SamplingParams(stop=[stop, "never appears"]), chunk=rng.randint(1, 3)
    )
    assert "".join(pieces) == full[: full.find(stop)]
    assert detok.stop_reason == stop


def test_stop_before_an_incomplete_character_in_the_same_token_is_found():
    tok = tokenizer()
    rocket = tok.encode("🚀")
    detok = Detokenizer(tok, SamplingParams(stop=["fun"]), [])
    assert detok.add(tok.encode("so fun") + rocket[:1]) == "so "
    assert detok.stop_reason == "fun"


def test_decode_window_stays_small_for_long_outputs():
    tok = tokenizer()
    calls = []

    class Counting(WrappedTokenizer):
        def decode(self, ids, skip_special_tokens=True):
            calls.append(len(ids))
            return super().decode(ids, skip_special_tokens)

    detok = Detokenizer(Counting(tok.hf), SamplingParams(), [])
    ids = tok.encode(" ".join(_CORPUS) * 4)
    for t in ids:
        detok.add([t])
    # A window spans at most two held-back characters of up to 4 byte tokens each, plus one.
    assert len(ids) > 300
    assert max(calls) <= 9
