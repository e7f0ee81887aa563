"""Where a request's tools and earlier calls go in the prompt (ponder/service/function_tools.py):
to a template that renders them, as transformers passes them; to one that does not, a system
message in the model's call syntax, and the calls written into the assistant's content."""

from __future__ import annotations

from ponder.engine.chat import render_chat_template
from ponder.engine.tool_calls import ToolCallFormat, tool_call_format
from ponder.service.function_tools import prompt_conversation

ADD = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
CALL = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
CONVERSATION = [
    {"role": "user", "content": "1 + 2?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "3", "tool_call_id": "call_1"},
]
# Qwen2.5's way, cut down: tools in the system turn, calls as <tool_call> JSON, results as tool turns.
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    '{% for call in m.tool_calls or [] %}<tool_call>\n{"name": "{{ call.function.name }}", '
    '"arguments": {{ call.function.arguments }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}'
    "<|im_start|>assistant\n"
)
PLAIN = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)


def test_a_template_that_renders_tools_gets_them_and_the_calls_as_given():
    assert tool_call_format(QWEN_LIKE) == ToolCallFormat.hermes
    messages, variables = prompt_conversation(CONVERSATION, [ADD], QWEN_LIKE, ToolCallFormat.hermes)
    assert variables == {"tools": [ADD]} and messages[1]["tool_calls"] == [CALL]
    prompt = render_chat_template(QWEN_LIKE, messages, **variables)
    assert '"name": "add"' in prompt and '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>' in prompt


def test_a_template_without_tools_gets_a_system_message_and_the_calls_in_the_content():
    messages, variables = prompt_conversation(CONVERSATION, [ADD], PLAIN, ToolCallFormat.hermes)
    assert variables == {} and messages[0]["role"] == "system" and '"name": "add"' in messages[0]["content"]
    assert "tool_calls" not in messages[2]
    assert messages[2]["content"] == '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>'
    prompt = render_chat_template(PLAIN, messages)
    assert prompt.count("<tool_call>") == 2  # the syntax shown, and the earlier call
    assert prompt_conversation(CONVERSATION[:1], None, PLAIN, ToolCallFormat.hermes) == (CONVERSATION[:1], {})
