"""Model registry by `model_type`. Entries are import paths: a model's module loads with the first
checkpoint of its type. Which types a config may name is config.py's (SUPPORTED_MODEL_TYPES), read
without torch."""

from __future__ import annotations

import importlib

from ponder.engine.errors import ModelLoadError

MODEL_REGISTRY = {
    "llama": "ponder.engine.runtime.models.llama:LlamaForCausalLM",
    "qwen2": "ponder.engine.runtime.models.llama:LlamaForCausalLM",  # Llama with q/k/v biases
    "deepseek_v3": "ponder.engine.runtime.models.deepseek_v3:DeepseekV3ForCausalLM",
}


def get_model_class(model_type: str):
    if model_type not in MODEL_REGISTRY:
        known = ", ".join(sorted(MODEL_REGISTRY))
        raise ModelLoadError(f"model_type {model_type!r} has no implementation yet (implemented: {known})")
    module_name, class_name = MODEL_REGISTRY[model_type].split(":")
    return getattr(importlib.import_module(module_name), class_name)


__all__ = ["MODEL_REGISTRY", "get_model_class"]
