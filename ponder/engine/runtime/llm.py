"""`LLM`: the offline convenience API over `LLMEngine` (vLLM's `LLM.generate` / `LLM.chat`)."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, cast

from ponder.engine.chat import apply_r1_conventions
from ponder.engine.config import EngineConfig, SamplingParams
from ponder.engine.outputs import RequestOutput
from ponder.engine.runtime.llm_engine import LLMEngine

Prompt = str | list[int]
Conversation = list[dict[str, Any]]


class LLM:
    def __init__(self, model: str | Path, device: str = "cpu", dtype: str = "float32", **engine_config: Any):
        self.engine = LLMEngine(model, EngineConfig(device=device, dtype=dtype, **engine_config))
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the tensor-parallel worker ranks, if any (see LLMEngine.close)."""
        self.engine.close()

    def generate(
        self, prompts: Prompt | list[Prompt], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        """Run every prompt (text or token ids) to completion; outputs come back in prompt order. With
        `SamplingParams(n=...)` a prompt's output holds its n samples in `outputs` (prefilled once)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        batch = cast(list[Prompt], prompts)  # one prompt or many: a list of them now
        token_lists = [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in batch]
        return self._run(token_lists, params)

    def chat(
        self,
        conversations: Conversation | list[Conversation],
        params: SamplingParams | list[SamplingParams] | None = None,
        fold_system: bool = False,
        math: bool = False,
        **template_kwargs: Any,
    ) -> list[RequestOutput]:
        """Render each conversation with the model's chat template and generate. `fold_system` and
        `math` apply DeepSeek-R1's usage rules (no system prompt; the maths directive)."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        batch = cast(list[Conversation], conversations)  # one conversation or many: a list of them now
        token_lists = []
        for messages in batch:
            if fold_system or math:
                messages = apply_r1_conventions(messages, fold_system=fold_system, math=math)
            token_lists.append(self.tokenizer.encode_chat(messages, **template_kwargs))
        return self._run(token_lists, params)

    def _run(self, token_lists: list[list[int]], params) -> list[RequestOutput]:
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(token_lists)
        if len(params_list) != len(token_lists):
            raise ValueError("give one SamplingParams, or one per prompt")
        ids = [f"llm-{next(self._ids)}" for _ in token_lists]
        try:
            for request_id, tokens, p in zip(ids, token_lists, params_list, strict=True):
                self.engine.add_request(request_id, tokens, p)
        except Exception:
            self._abort(ids)  # all or nothing: no half of a batch left running
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[i] for i in ids]

    def _abort(self, ids: list[str]) -> None:
        for request_id in ids:
            self.engine.abort_request(request_id)
        while self.engine.has_unfinished_requests():
            self.engine.step()
