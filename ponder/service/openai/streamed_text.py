"""Following a job's text on its stream, for the OpenAI stream formats: what was sent, and a re-run
(after a worker failed) that rewinds or resets the text, which a client cannot take back."""

from __future__ import annotations

from ponder.engine.outputs import TokenLogprob
from ponder.engine.reasoning import count_reasoning_tokens
from ponder.service.job_public import SamplePublic
from ponder.service.logprobs import stream_segments
from ponder.service.streams import DELTA_TYPES, LOGPROBS_TYPE, JobEvent
from ponder.service.tables import Job


def whole_text(job: Job | SamplePublic) -> dict[str, str]:
    """A finished job's text by kind, as its row has it."""
    return {"reasoning": job.reasoning_content or "", "content": job.content or ""}


class Diverged(Exception):
    """A re-run's text is not an extension of what the chat stream already sent."""


class SentText:
    """One sample's reasoning and content, as its job's stream has them and as a chat stream sent
    them. A job's stream can take text back (a re-run after its worker died: `reset` starts it over,
    `rewind` cuts it back to the checkpoint); chunks cannot. So only text that extends what was
    sent is sent: a seeded or greedy re-run writes the same text again, and the stream goes on
    once it is past what was sent. A re-run whose text differs (sampling without a seed) raises
    `Diverged`."""

    def __init__(self) -> None:
        self.text = {kind: "" for kind in DELTA_TYPES}
        self.sent = {kind: "" for kind in DELTA_TYPES}

    def apply(self, event: JobEvent) -> None:
        if event.kind in DELTA_TYPES:
            self.text[event.kind] += event.data.get("delta", "")
        elif event.kind == "reset":
            self.text = {kind: "" for kind in DELTA_TYPES}
        elif event.kind == "rewind":
            self.text = {kind: text[: int(event.data.get(kind, len(text)))] for kind, text in self.text.items()}

    def end_with(self, text: dict[str, str]) -> None:
        """The whole text, as the job's row has it once it has ended: it must extend what was sent."""
        if any(not text[kind].startswith(sent) for kind, sent in self.sent.items()):
            raise Diverged("the result")
        self.text = text

    def unsent(self, calls_start: str | None = None, final: bool = False) -> dict[str, str]:
        """What to send now, by kind (marked sent). With `calls_start` (a request with tools) the
        content stops where the calls start, and until `final` a tail that may be their start's
        first characters waits for the next delta to tell."""
        new = {}
        for kind, text in self.text.items():
            if kind == "content" and calls_start is not None:
                text = _before_calls(text, calls_start, final)
            sent = self.sent[kind]
            if not (text.startswith(sent) or sent.startswith(text)):
                raise Diverged(kind)
            if len(text) > len(sent):
                new[kind], self.sent[kind] = text[len(sent) :], text
        return new


class SentLogprobs:
    """One sample's log probabilities, as its job's stream has them (by token position) and as a
    chat stream sent them. A re-run writes the positions it regenerates again: what was sent is
    not sent twice (the text's SentText decides whether the re-run's tokens are the same ones)."""

    def __init__(self) -> None:
        self.values: list[TokenLogprob] = []
        self.sent = 0

    def apply(self, event: JobEvent) -> None:
        if event.kind == LOGPROBS_TYPE:
            for first, values in stream_segments(event.data.get("delta", "")):
                if first <= len(self.values):
                    self.values[first:] = values
        elif event.kind == "reset":
            self.values = []

    def end_with(self, values: list[TokenLogprob]) -> None:
        """Every token's values, as the job's row has them once it has ended."""
        self.values = values

    def unsent(self) -> list[TokenLogprob]:
        new = self.values[self.sent :]
        self.sent = max(self.sent, len(self.values))
        return new


class SentAnswerLogprobs:
    """The answer's tokens' values as a response stream sends them (include
    message.output_text.logprobs): each once, in order, the thinking's left out. Where the answer
    begins is the engine's own count (count_reasoning_tokens: up to and including the end tag's
    tokens) while the job runs, and the row's reasoning_tokens once it has ended."""

    def __init__(self, think_end_ids: list[int]) -> None:
        self.values, self.think_end_ids = SentLogprobs(), think_end_ids
        self.sent = 0  # of the answer's
        self.reasoning_tokens: int | None = None  # known at the end

    def apply(self, event: JobEvent) -> None:
        self.values.apply(event)

    def end_with(self, values: list[TokenLogprob], reasoning_tokens: int) -> None:
        self.values.end_with(values)
        self.reasoning_tokens = reasoning_tokens

    def unsent(self, thinking: bool) -> list[TokenLogprob]:
        """The answer's values not sent yet; `thinking`: the job began by thinking (until its end tag
        every token is the thinking's)."""
        tokens = self.values.values
        start = self.reasoning_tokens
        if start is None:
            start = count_reasoning_tokens([value.token_id for value in tokens], self.think_end_ids, thinking)
        new = tokens[start + self.sent :]
        self.sent += len(new)
        return new


def _before_calls(text: str, calls_start: str, final: bool) -> str:
    """The content that may be sent: before the calls, and no blank start (the answer may be
    whitespace and then calls: no content at all)."""
    if (at := text.find(calls_start)) >= 0:
        text = text[:at]
    if final or at >= 0 or not text.strip():
        return text if text.strip() else ""
    held = next((n for n in range(min(len(calls_start) - 1, len(text)), 0, -1) if calls_start.startswith(text[-n:])), 0)
    return text[: len(text) - held]
