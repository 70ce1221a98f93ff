"""The tokenizer the engine and server use: a thin wrapper over HF `AutoTokenizer`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class TokenizerError(RuntimeError):
    """The tokenizer cannot be loaded, or cannot do what was asked (e.g. no chat template)."""


class Tokenizer:
    """Encoding, decoding, chat formatting and the stop ids of one model.

    `eos_token_ids` joins the tokenizer's EOS token with `generation_config.json`'s
    `eos_token_id` (an int or a list): chat models often end turns with a token other than the
    tokenizer's EOS. `hf` is the underlying transformers tokenizer.
    """

    def __init__(self, hf: Any, eos_token_ids: frozenset[int]) -> None:
        self.hf = hf
        self.eos_token_ids = eos_token_ids
        # The incremental detokenizer decodes twice per generated token and request, on the
        # step loop: go straight to the Rust tokenizer (~10x cheaper than transformers'
        # wrapper) where that wrapper adds nothing (no clean-up of tokenization spaces).
        backend = getattr(hf, "backend_tokenizer", None)
        cleans_up = getattr(hf, "clean_up_tokenization_spaces", False)
        self._backend_decode = backend.decode if backend is not None and not cleans_up else None

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return len(self.hf)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=add_special_tokens))

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._backend_decode is not None:
            return self._backend_decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self.hf.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True
    ) -> list[int]:
        """Token ids of `messages` formatted with the model's chat template."""
        if not getattr(self.hf, "chat_template", None):
            raise TokenizerError(
                f"the tokenizer of {self.hf.name_or_path} has no chat template; "
                "send a plain prompt instead"
            )
        # Tokenise the rendered text without adding specials: the template already has them.
        text = self.hf.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return self.encode(text, add_special_tokens=False)


class TokenIdTokenizer(Tokenizer):
    """Stands in for a missing tokenizer when a model runs on dummy weights (benchmarks of a
    real config without its files): text is the token ids, written as `<id>`."""

    def __init__(self, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        super().__init__(None, eos_token_ids)
        self._vocab_size = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        raise TokenizerError("this model has no tokenizer (dummy weights); send token ids")

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(f"<{i}>" for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> list[int]:
        raise TokenizerError("this model has no tokenizer (dummy weights); send token ids")


def load_tokenizer(model_dir: str | Path, allow_missing: bool = False) -> Tokenizer:
    """Load the tokenizer of a local model directory (offline; no hub access).

    With `allow_missing`, a directory without tokenizer files gets a `TokenIdTokenizer`."""
    from transformers import AutoTokenizer

    model_dir = Path(model_dir)
    if allow_missing and not any(model_dir.glob("tokenizer*")):
        config = json.loads((model_dir / "config.json").read_text())
        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [] if eos is None else [eos]
        return TokenIdTokenizer(int(config["vocab_size"]), frozenset(eos_ids))
    try:
        hf = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot load a tokenizer from {model_dir}: {e}") from e
    eos = set()
    if hf.eos_token_id is not None:
        eos.add(hf.eos_token_id)
    eos |= _generation_eos_ids(model_dir)
    return Tokenizer(hf, frozenset(eos))


def _generation_eos_ids(model_dir: Path) -> set[int]:
    path = model_dir / "generation_config.json"
    if not path.is_file():
        return set()
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if value is None:
        return set()
    return {int(v) for v in (value if isinstance(value, list) else [value])}
