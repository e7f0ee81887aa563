"""Ponder's inference engine. Public names load lazily, so `import ponder.engine.tokenizer` (the API
process) never pulls in torch."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "ponder.engine.llm",
    "LLMEngine": "ponder.engine.llm_engine",
    "EngineConfig": "ponder.engine.config",
    "ModelConfig": "ponder.engine.config",
    "SamplingParams": "ponder.engine.config",
    "RequestOutput": "ponder.engine.outputs",
    "CompletionOutput": "ponder.engine.outputs",
    "Usage": "ponder.engine.outputs",
    "Tokenizer": "ponder.engine.tokenizer",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
