"""The reasoning split, the boxed answer, and the thinking budget."""

from __future__ import annotations

import random

import pytest

from ponder.engine import SamplingParams
from ponder.engine.reasoning import ReasoningParser, count_reasoning_tokens, extract_boxed_answer


def split(text: str, reasoning_mode: bool, pieces: int = 1, seed: int = 0) -> tuple[str, str]:
    """Feed `text` in `pieces` random chunks; return the concatenated (reasoning, content)."""
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), min(pieces - 1, len(text) - 1))) if pieces > 1 else []
    parser = ReasoningParser(reasoning_mode)
    reasoning = content = ""
    for start, end in zip([0, *cuts], [*cuts, len(text)], strict=True):
        r, c = parser.feed(text[start:end])
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c


CASES = [
    # (output text, prompt opened <think>, expected reasoning, expected content)
    ("Let me think.\nIt is 4.\n</think>\n\nThe answer is 4.", True, "Let me think.\nIt is 4.", "The answer is 4."),
    ("<think>\nhmm\n</think>\n\nDone.", False, "hmm", "Done."),
    ("<think>hmm</think>Done.", True, "hmm", "Done."),
    ("still thinking when cut off", True, "still thinking when cut off", ""),
    ("Plain answer, no thinking.", False, "", "Plain answer, no thinking."),
    (" leading space kept", False, "", " leading space kept"),
    ("a < b and </thin is not a tag", True, "a < b and </thin is not a tag", ""),
    ("x</think>", True, "x", ""),
]


@pytest.mark.parametrize(("text", "mode", "reasoning", "content"), CASES)
@pytest.mark.parametrize("pieces", [1, 3, 7, 50])
def test_split_is_the_same_however_the_text_is_chunked(text, mode, reasoning, content, pieces):
    for seed in range(5):
        assert split(text, mode, pieces, seed) == (reasoning, content)


@pytest.mark.parametrize(
    ("text", "answer"),
    [
        ("so \\boxed{42}.", "42"),
        ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{ {a}+{b} }", "{a}+{b}"),
        ("unclosed at the end \\boxed{3} and \\boxed{4", "3"),
        ("no box here", None),
        ("\\boxed {7}", "7"),
    ],
)
def test_boxed_answer(text, answer):
    assert extract_boxed_answer(text) == answer


def test_count_reasoning_tokens():
    assert count_reasoning_tokens([5, 6, 9, 7, 8], [9], in_reasoning=True) == 3
    assert count_reasoning_tokens([5, 6, 7], [9], in_reasoning=True) == 3
    assert count_reasoning_tokens([5, 6, 7], [9], in_reasoning=False) == 0


def test_thinking_budget_forces_the_end_of_thinking(make_llm):
    # tiny-llama's chat template opens <think> like R1's; its random weights never close it.
    llm = make_llm("tiny-llama")
    messages = [{"role": "user", "content": "hi"}]
    params = SamplingParams(temperature=0, max_tokens=30, max_reasoning_tokens=8, ignore_eos=True)
    (out,) = llm.chat(messages, params)
    think_end = llm.tokenizer.token_to_id("</think>")
    assert think_end in out.token_ids
    assert out.token_ids.index(think_end) <= 8 + 1  # budget, then the forced "\n</think>"
    assert out.usage.reasoning_tokens == out.token_ids.index(think_end) + 1
    assert out.reasoning_content and out.content
    assert out.text.count("</think>") == 1
    (unbounded,) = llm.chat(messages, SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert unbounded.content == "" and unbounded.usage.reasoning_tokens == 30
    assert out.token_ids[:8] == unbounded.token_ids[:8]


def test_budget_does_not_apply_outside_reasoning(make_llm):
    llm = make_llm("tiny-qwen2")  # its template does not open thinking
    (out,) = llm.generate(list(b"plain"), SamplingParams(temperature=0, max_tokens=12, max_reasoning_tokens=2))
    assert out.usage.reasoning_tokens == 0 and out.content == out.text
