"""Chat templates (jinja, rendered exactly as transformers renders them) and the R1 usage rules."""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ponder.engine.errors import PonderEngineError

# DeepSeek-R1 model card: append this to maths prompts.
MATH_DIRECTIVE = "Please reason step by step, and put your final answer within \\boxed{}."
ROLES = ("system", "user", "assistant", "tool")


class ChatTemplateError(PonderEngineError, ValueError):
    """A conversation that cannot be rendered (bad messages, no template, or the template refused)."""


def render_chat_template(
    template: str | None,
    messages: list[dict[str, Any]],
    add_generation_prompt: bool = True,
    **variables: Any,
) -> str:
    if not template:
        raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
    messages = validate_messages(messages)
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as e:
        raise ChatTemplateError(f"chat template error: {e}") from e


def validate_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages as the templates expect them: role + string content (text parts are joined)."""
    if not isinstance(messages, list) or not messages:
        raise ChatTemplateError("messages must be a non-empty list")
    cleaned = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ChatTemplateError(f"messages[{i}]: needs a role, one of {', '.join(ROLES)}")
        cleaned.append({**message, "content": _text_content(message.get("content"), i)})
    return cleaned


def _text_content(content: Any, index: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in content):
        return "".join(str(p.get("text", "")) for p in content)
    raise ChatTemplateError(f"messages[{index}].content must be a string or a list of text parts")


def apply_r1_conventions(
    messages: list[dict[str, Any]], fold_system: bool = True, math: bool = False
) -> list[dict[str, Any]]:
    """DeepSeek-R1's usage rules: no system prompt (its text goes into the first user turn) and,
    for maths, the step-by-step/boxed directive appended to the last user turn."""
    messages = validate_messages(messages)
    if fold_system:
        messages = _fold_system(messages)
    if math:
        last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last_user is None:
            raise ChatTemplateError("math: the conversation has no user message to append the directive to")
        message = messages[last_user]
        messages[last_user] = {**message, "content": f"{message['content'].rstrip()}\n{MATH_DIRECTIVE}"}
    return messages


def _fold_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    rest = [dict(m) for m in messages if m["role"] != "system"]
    if not system:
        return rest
    first_user = next((m for m in rest if m["role"] == "user"), None)
    if first_user is None:
        return [{"role": "user", "content": system}, *rest]
    first_user["content"] = f"{system}\n\n{first_user['content']}"
    return rest


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # The same environment transformers uses, so templates written for it render identically.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template does not parse: {e}") from e


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
