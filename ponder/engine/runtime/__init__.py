"""The engine's torch runtime: the offline `LLM`, the `LLMEngine` it drives, and below them the
model runner (ranks, KV cache, drafter, seeded noise), the loader, layers/ and models/."""

from ponder.engine.runtime.llm import LLM
from ponder.engine.runtime.llm_engine import LLMEngine

__all__ = ["LLM", "LLMEngine"]
