"""The Responses API's reasoning: the request's `reasoning` options, the `reasoning` output item,
and an earlier one passed back in `input`.

R1 has no summarizer, so a reasoning summary (`reasoning.summary`: auto, concise or detailed, all
alike) is the reasoning's last paragraph, where R1's thinking states what it concluded: one
`summary_text` part. With `include: ["reasoning.encrypted_content"]` the item carries its text
sealed under a key of the server's (ponder/service/encryption.py:seal_reasoning). Both are given
once the reasoning has ended (the item completed or incomplete), never while it is in progress.

An item passed back is dropped from the prompt (R1's usage rules: earlier turns' thinking is not
fed back), but its `encrypted_content`, when it has one, must open under the server's keys: an
altered token, or one another deployment made, is a 400 naming it."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ponder.service.encryption import UnopenableReasoning, open_reasoning, seal_reasoning
from ponder.service.errors import InvalidRequest
from ponder.service.openai.chat_schemas import ReasoningEffort
from ponder.service.settings import Settings

# What `include` names for a reasoning item's encrypted_content.
REASONING_INCLUDE = "reasoning.encrypted_content"
ReasoningSummary = Literal["auto", "concise", "detailed"]
ItemStatus = Literal["in_progress", "completed", "incomplete"]  # any output item's
_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
MAX_SEALED_CHARS = 4_000_000  # a whole context of thinking, sealed and base64-encoded, with room


class ReasoningRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    effort: ReasoningEffort | None = Field(
        None, description="A thinking budget: 20%, 50% or 80% of max_output_tokens; unset: none"
    )
    summary: ReasoningSummary | None = Field(
        None, description="Any of the three: the reasoning item's summary is the reasoning's last paragraph"
    )
    generate_summary: ReasoningSummary | None = Field(None, description="Deprecated: summary's old name")

    @property
    def summarized(self) -> bool:
        return (self.summary or self.generate_summary) is not None


class ReasoningText(BaseModel):
    type: Literal["reasoning_text"] = "reasoning_text"
    text: str


class SummaryText(BaseModel):
    type: Literal["summary_text"] = "summary_text"
    text: str


class ReasoningItem(BaseModel):
    id: str = Field(description="rs_<the job's id, hex>")
    type: Literal["reasoning"] = "reasoning"
    summary: list[SummaryText] = Field(
        default_factory=list,
        description="With reasoning.summary, once the reasoning has ended: its last paragraph; else empty",
    )
    content: list[ReasoningText] = Field(description="The thinking: the text before </think>")
    encrypted_content: str | None = Field(
        None,
        description="With include reasoning.encrypted_content, once the reasoning has ended: the thinking sealed"
        " under the server's key (AES-SIV), to pass back in a later turn's input",
    )
    status: ItemStatus


class ReasoningInput(BaseModel):
    """An earlier `reasoning` output item, passed back as the API returned it."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["reasoning"]
    id: str | None = None
    summary: list[SummaryText] = Field(default_factory=list)
    content: list[ReasoningText] | None = None
    encrypted_content: str | None = Field(None, max_length=MAX_SEALED_CHARS)
    status: str | None = None


def last_paragraph(text: str) -> str:
    """The text after its last blank line, stripped (the whole text stripped when it has none);
    "" for blank text."""
    paragraphs = [paragraph.strip() for paragraph in _PARAGRAPH_BREAK.split(text)]
    return next((paragraph for paragraph in reversed(paragraphs) if paragraph), "")


def shown_reasoning(item: ReasoningItem, shown: dict[str, Any], settings: Settings) -> ReasoningItem:
    """The item as its request (`shown`: Job.openai_response) asked to see it: a function of the
    text and the request alone, so every reading of the response (GET, the stream, a batch line)
    shows the same."""
    if item.status == "in_progress" or not item.content:
        return item
    text = item.content[0].text
    summary = last_paragraph(text) if ReasoningRequest.model_validate(shown.get("reasoning") or {}).summarized else ""
    sealed = REASONING_INCLUDE in (shown.get("include") or [])
    return item.model_copy(
        update={
            "summary": [SummaryText(text=summary)] if summary else [],
            "encrypted_content": seal_reasoning(text, settings) if sealed else None,
        }
    )


def check_sealed(items: list[Any], settings: Settings) -> None:
    """Every reasoning item passed back with encrypted_content opens under the server's keys (its
    text is then dropped with the item: earlier thinking is not fed back)."""
    for index, item in enumerate(items):
        if not isinstance(item, ReasoningInput) or item.encrypted_content is None:
            continue
        try:
            open_reasoning(item.encrypted_content, settings)
        except UnopenableReasoning as e:
            param = f"input.{index}.encrypted_content"
            raise InvalidRequest(f"{param}: {e}", param, code="invalid_encrypted_content") from e
