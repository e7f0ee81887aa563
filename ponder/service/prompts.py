"""Prompts on the API side: render the chat template, count tokens, check the context fits.

Tokenizer only (no torch, no weights): the token ids computed here are stored with the job and
are exactly what the worker's engine runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

from ponder.engine.chat import MATH_DIRECTIVE, ChatTemplateError, apply_r1_conventions
from ponder.engine.config import ModelConfig
from ponder.engine.errors import ConfigError, PonderEngineError
from ponder.engine.model_store import resolve_model
from ponder.engine.tokenizer import Tokenizer
from ponder.engine.tool_calls import ToolCallFormat, tool_call_format
from ponder.service.errors import InvalidRequest, Unprocessable
from ponder.service.function_tools import as_json, prompt_conversation
from ponder.service.logprobs import MAX_LOGPROB_VALUES, logprob_values
from ponder.service.schemas import JobCreate
from ponder.service.settings import Settings


@dataclass(frozen=True)
class ServedModel:
    name: str
    tokenizer: Tokenizer
    max_model_len: int
    vocab_size: int
    created: int  # unix time the model's files were made or fetched (OpenAI's `created` of a model)


@lru_cache(maxsize=4)
def served_model(name: str, max_model_len: int | None) -> ServedModel:
    path = resolve_model(name)
    config = ModelConfig.from_pretrained(path)
    limit = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    return ServedModel(name, Tokenizer.from_pretrained(path), limit, config.vocab_size, int(path.stat().st_mtime))


@dataclass(frozen=True)
class PreparedPrompt:
    token_ids: list[int]
    max_tokens: int


def prepare_prompt(body: JobCreate, settings: Settings) -> PreparedPrompt:
    if body.model is not None and body.model != settings.model:
        raise InvalidRequest(
            f"model {body.model!r} is not served here (this deployment serves {settings.model!r})", "model"
        )
    model = served_model(settings.model, settings.engine.max_model_len)
    token_ids = _tokenize(body, model.tokenizer)
    param = "messages" if body.messages is not None else "prompt"
    room = model.max_model_len - len(token_ids)
    max_tokens = body.max_tokens if body.max_tokens is not None else min(settings.default_max_tokens, room)
    if max_tokens > settings.max_tokens_limit:
        raise Unprocessable(
            f"max_tokens {max_tokens} exceeds this deployment's limit {settings.max_tokens_limit}", "max_tokens"
        )
    if max_tokens < 1 or len(token_ids) + max_tokens > model.max_model_len:
        raise InvalidRequest(
            f"the prompt has {len(token_ids)} tokens and max_tokens is {max_tokens}: together "
            f"{len(token_ids) + max_tokens}, more than max_model_len {model.max_model_len}",
            param if body.max_tokens is None or len(token_ids) >= model.max_model_len else "max_tokens",
        )
    _check_sampling(body, model, max_tokens, settings.engine.max_num_seqs)
    _check_prompt_tokens(body, token_ids, model)
    _check_tools(body, model)
    return PreparedPrompt(token_ids, max_tokens)


def _check_prompt_tokens(body: JobCreate, token_ids: list[int], model: ServedModel) -> None:
    """A prompt given as token ids is in the vocabulary; its log probabilities fit what a job keeps."""
    if outside := [token for token in token_ids if token >= model.vocab_size]:
        raise InvalidRequest(
            f"prompt token id {outside[0]} is outside the vocabulary ({model.vocab_size} tokens)", "prompt"
        )
    k = body.prompt_logprobs
    if k is not None and (values := len(token_ids) * (1 + k)) > MAX_LOGPROB_VALUES:
        raise Unprocessable(
            f"prompt_logprobs: {len(token_ids)} prompt tokens x (1 + {k}) = {values} values, more than a job "
            f"keeps ({MAX_LOGPROB_VALUES})",
            "prompt_logprobs",
        )


def _check_tools(body: JobCreate, model: ServedModel) -> None:
    """The grammar of forced calls compiles in the served model's syntax (each function's
    parameters were checked alone by the schema; a response format was compiled there too)."""
    try:
        body.calls_constraint(tool_call_format(model.tokenizer.chat_template))
    except ConfigError as e:
        raise InvalidRequest(f"the tools cannot be enforced: {e}", "tools") from e


def _check_sampling(body: JobCreate, model: ServedModel, max_tokens: int, max_num_seqs: int) -> None:
    """Bounds that depend on the model, the engine or the resolved max_tokens (the schema checks the rest)."""
    if body.n > max_num_seqs:
        raise Unprocessable(f"n {body.n} exceeds the sequences an engine runs at once ({max_num_seqs})", "n")
    if body.top_k > model.vocab_size:
        raise Unprocessable(f"top_k {body.top_k} exceeds the vocabulary ({model.vocab_size} tokens)", "top_k")
    if outside := [token for token in body.logit_bias or {} if token >= model.vocab_size]:
        raise Unprocessable(
            f"logit_bias names token id {outside[0]}, outside the vocabulary ({model.vocab_size} tokens)", "logit_bias"
        )
    kept = body.kept_logprobs
    if kept is not None and (values := logprob_values(max_tokens, body.n, kept)) > MAX_LOGPROB_VALUES:
        raise Unprocessable(
            f"logprobs: max_tokens x n x (1 + top_logprobs) = {values} values, more than a job keeps "
            f"({MAX_LOGPROB_VALUES}); lower max_tokens, n or top_logprobs",
            "top_logprobs" if kept else "max_tokens",
        )
    if body.min_tokens > max_tokens:
        raise Unprocessable(f"min_tokens {body.min_tokens} exceeds max_tokens {max_tokens}", "min_tokens")
    if body.max_reasoning_tokens is not None and body.max_reasoning_tokens > max_tokens:
        raise Unprocessable(
            f"max_reasoning_tokens {body.max_reasoning_tokens} exceeds max_tokens {max_tokens} (the budget "
            "counts reasoning tokens, which are completion tokens)",
            "max_reasoning_tokens",
        )


def _tokenize(body: JobCreate, tokenizer: Tokenizer) -> list[int]:
    try:
        if body.messages is not None:
            tools = as_json(body.tools)
            messages, variables = prompt_conversation(
                as_json(body.messages), tools, tokenizer.chat_template, tool_call_format(tokenizer.chat_template)
            )
            # DeepSeek-R1's usage rules: no system prompt (folded into the first user turn).
            messages = apply_r1_conventions(messages, fold_system=True, math=body.math)
            return tokenizer.encode_chat(messages, **variables)
        assert body.prompt is not None  # JobCreate holds exactly one of messages or prompt
        if not isinstance(body.prompt, str):
            return list(body.prompt)  # token ids, taken as given (their vocabulary: _check_sampling)
        prompt = f"{body.prompt.rstrip()}\n{MATH_DIRECTIVE}" if body.math else body.prompt
        return tokenizer.encode(prompt)
    except ChatTemplateError as e:
        raise Unprocessable(str(e), "messages") from e
    except PonderEngineError as e:
        raise InvalidRequest(str(e)) from e


def served_tokenizer(settings: Settings) -> Tokenizer:
    return served_model(settings.model, settings.engine.max_model_len).tokenizer


def served_tool_format(settings: Settings) -> ToolCallFormat:
    """The served model's tool-call syntax (its chat template's)."""
    return tool_call_format(served_tokenizer(settings).chat_template)


def prompt_token_ids(body: JobCreate, settings: Settings) -> list[int]:
    """The ids a job's prompt becomes (what an offline run must feed the engine to compare)."""
    return _tokenize(body, served_tokenizer(settings))
