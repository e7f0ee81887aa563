"""The R1 reasoning split (text before `</think>` vs after) and the `\\boxed{}` answer.

R1's chat template ends the prompt with `<think>\\n`, so the model usually never writes the opening
tag: in *reasoning mode* everything up to `</think>` is reasoning even without `<think>`. Outside
reasoning mode, output that opens with `<think>` still switches to reasoning. The split streams:
`feed()` takes text deltas and returns (reasoning, content) deltas whose concatenations are the
final fields, holding back only what could still be part of a tag.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ponder.engine.tokenizer import Tokenizer

THINK_START = "<think>"
THINK_END = "</think>"
# Forced when the thinking budget runs out (the line break keeps the tag on its own line, as R1 writes it).
THINK_END_FORCED = "\n</think>\n\n"


def prompt_opens_thinking(tokenizer: Tokenizer, prompt_token_ids: list[int]) -> bool:
    """R1's template ends the prompt with `<think>\\n`: then the output starts inside reasoning."""
    tail = tokenizer.decode(prompt_token_ids[-8:], skip_special_tokens=False)
    return tail.rstrip().endswith(THINK_START)


class ReasoningParser:
    """Incremental splitter of generated text into reasoning and content; with `split` False all of
    it is content, exactly as generated (tags included)."""

    def __init__(self, reasoning_mode: bool, split: bool = True) -> None:
        self.reasoning_mode = reasoning_mode and split
        self.phase = "start" if split else "content"  # start -> reasoning -> content, or start -> content
        self._buffer = ""
        self._channel_started = {"reasoning": False, "content": False}
        self.saw_reasoning = False

    @property
    def in_reasoning(self) -> bool:
        return self.phase == "reasoning" or (self.phase == "start" and self.reasoning_mode)

    def feed(self, delta: str) -> tuple[str, str]:
        self._buffer += delta
        reasoning, content = "", ""
        while True:
            if self.phase == "start" and not self._leave_start():
                break
            if self.phase == "reasoning":
                end = self._buffer.find(THINK_END)
                if end < 0:
                    reasoning += self._emit("reasoning", self._take(_holdback(self._buffer)))
                    break
                reasoning += self._emit("reasoning", self._buffer[:end].rstrip())
                self._buffer = self._buffer[end + len(THINK_END) :]
                self.phase = "content"
            if self.phase == "content":
                content += self._emit("content", self._take(0))
                break
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """Flush what was held back at the end of generation."""
        if self.phase == "start":
            self.phase = "reasoning" if self.reasoning_mode else "content"
        channel = "reasoning" if self.phase == "reasoning" else "content"
        text = self._emit(channel, self._take(0))
        return (text, "") if channel == "reasoning" else ("", text)

    def _leave_start(self) -> bool:
        """Decide the first phase once the text can no longer turn out to be an opening tag."""
        stripped = self._buffer.lstrip()
        if stripped.startswith(THINK_START):
            self._buffer = stripped[len(THINK_START) :]
            self.phase = "reasoning"
        elif THINK_START.startswith(stripped):
            return False  # still could be "<think>" (or only whitespace so far)
        else:
            self.phase = "reasoning" if self.reasoning_mode else "content"
        if self.phase == "reasoning":
            self.saw_reasoning = True
        return True

    def _take(self, keep: int) -> str:
        cut = len(self._buffer) - keep
        text, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return text

    def _emit(self, channel: str, text: str) -> str:
        # Each channel drops its leading whitespace, except content that never followed reasoning:
        # a plain completion keeps its text exactly.
        if not self._channel_started[channel] and (channel == "reasoning" or self.saw_reasoning):
            text = text.lstrip()
        if text:
            self._channel_started[channel] = True
        return text


def _holdback(buffer: str) -> int:
    """How many trailing characters might still be the start of `</think>` or the whitespace
    right before it (which the reasoning drops)."""
    keep = 0
    for n in range(min(len(THINK_END) - 1, len(buffer)), 0, -1):
        if THINK_END.startswith(buffer[-n:]):
            keep = n
            break
    body = buffer[: len(buffer) - keep]
    return keep + len(body) - len(body.rstrip())


def extract_boxed_answer(text: str) -> str | None:
    """The contents of the last complete `\\boxed{...}` (nested braces balanced), or None."""
    start = text.rfind("\\boxed")
    while start >= 0:
        answer = _balanced_braces(text, start + len("\\boxed"))
        if answer is not None:
            return answer.strip()
        start = text.rfind("\\boxed", 0, start)
    return None


def _balanced_braces(text: str, pos: int) -> str | None:
    while pos < len(text) and text[pos] == " ":
        pos += 1
    if pos >= len(text) or text[pos] != "{":
        return None
    depth = 0
    for i in range(pos, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[pos + 1 : i]
    return None


def count_reasoning_tokens(output_ids: list[int], think_end_ids: list[int], in_reasoning: bool) -> int:
    """Output tokens up to and including the end-of-thinking tokens; all of them while still thinking."""
    if not think_end_ids:
        return len(output_ids) if in_reasoning else 0
    n = len(think_end_ids)
    for i in range(len(output_ids) - n + 1):
        if output_ids[i : i + n] == think_end_ids:
            return i + n
    return len(output_ids) if in_reasoning else 0
