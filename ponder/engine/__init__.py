"""Ponder's inference engine, in three parts the folders name:

- `ponder/engine/*.py`: the torch-free part: configuration, tokenizer, chat template, reasoning
  split, scheduler, block manager, model cache, outputs. The API process imports it; none of it
  imports torch, Triton or the runtime (tests/test_layout.py).
- `ponder/engine/runtime/`: the torch runtime: `LLM`, `LLMEngine`, the model runner, the layers
  and models, the loader, tensor parallelism.
- `ponder/engine/tools/`: what is not a runtime: the tiny-model factory, the sizing calculator.

This package exports the torch-free public names; `LLM` and `LLMEngine` come from
`ponder.engine.runtime`.
"""

from ponder.engine.config import EngineConfig, ModelConfig, SamplingParams
from ponder.engine.outputs import CompletionOutput, RequestOutput, Usage

__all__ = ["CompletionOutput", "EngineConfig", "ModelConfig", "RequestOutput", "SamplingParams", "Usage"]
