"""pegboard.core — the engine: step loop, hookspecs, plugin manager, model runner, server."""

from pegboard.sdk.types import SamplingParams

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    # LLM pulls in torch models and tokenizers; import it only when asked for.
    if name == "LLM":
        from pegboard.core.llm import LLM

        return LLM
    raise AttributeError(name)
