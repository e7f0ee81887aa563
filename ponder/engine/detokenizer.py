"""Incremental detokenisation with stop strings.

Each step decodes only a short window of ids (as vLLM does): the text of ids[prefix:] minus the
text of ids[prefix:read]. A window that ends inside a multi-byte UTF-8 character decodes to U+FFFD
and is held back until the character completes, so streamed deltas never carry broken bytes.
Stop strings are cut from the text, and the last len(longest stop)-1 characters are held back so
that a stop string is never half-streamed: the deltas always concatenate to the final text.
With `min_tokens` (as vLLM), a stop string counts only where it is completed by output token
min_tokens or a later one; one that ends in the text of earlier tokens is text like any other.
"""

from __future__ import annotations

from ponder.engine.tokenizer import Tokenizer

# Prompt tokens kept in front of the window so that decoders which strip a leading space
# (sentencepiece) see the same context as a full decode.
PROMPT_CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: list[int],
        stop: list[str] | None = None,
        skip_special_tokens: bool = True,
        min_tokens: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = list(stop or [])
        self._stop_holdback = max((len(s) for s in self.stop), default=1) - 1
        self._ids = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self.text = ""  # decoded output text so far, stop string cut
        self._emitted = 0
        self.stopped_by: str | None = None
        self.min_tokens = min_tokens
        self._num_added = 0  # output tokens fed

    def add_tokens(self, token_ids: list[int]) -> str:
        """Feed new output ids; returns the new text that is safe to stream."""
        if self.stopped_by is not None:
            return ""
        self._ids.extend(token_ids)
        self._num_added += len(token_ids)
        text_before = len(self.text)
        self.text += self._decode_new(final=False)
        if self._num_added >= self.min_tokens:
            self._check_stop(text_before)
        return self._flush(final=self.stopped_by is not None)

    def finish(self) -> str:
        """The remaining text once generation ended (held-back bytes included)."""
        if self.stopped_by is None:
            self.text += self._decode_new(final=True)
        return self._flush(final=True)

    def _decode_new(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix_text = decode(self._ids[self._prefix_offset : self._read_offset], self.skip_special_tokens)
        new_text = decode(self._ids[self._prefix_offset :], self.skip_special_tokens)
        if len(new_text) <= len(prefix_text) or (new_text.endswith("\ufffd") and not final):
            return ""  # nothing yet, or a character still incomplete
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return new_text[len(prefix_text) :]

    def _check_stop(self, text_before: int) -> None:
        """Stop at the first stop string that ends in the text after `text_before` characters."""
        starts = [(s, max(0, text_before - len(s) + 1)) for s in self.stop]
        hits = [(pos, s) for s, start in starts if (pos := self.text.find(s, start)) >= 0]
        if hits:
            pos, stop = min(hits)
            self.text = self.text[:pos]
            self.stopped_by = stop

    def _flush(self, final: bool) -> str:
        end = len(self.text) if final else max(self._emitted, len(self.text) - self._stop_holdback)
        delta = self.text[self._emitted : end]
        self._emitted = end
        return delta
