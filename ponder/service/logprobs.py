"""Log probabilities as a job keeps them and as the APIs show them (docs/architecture.md#log-probabilities).

Kept packed: a run of tokens' values is one string, `<k>:<ids>:<values>`, the two arrays
little-endian int32 and float32 in base64, each token's own id and log probability followed by
its top-k alternatives' (id -1 where a token has fewer). About 11 bytes per value against ~60 as
JSON, and exact: the engine computes them in float32. A job keeps at most MAX_LOGPROB_VALUES of
them (max_tokens x n x (1 + top_logprobs), refused at submission beyond that).

A job's stream carries them as `logprobs` entries of `<first token's position>@<packed>` segments
separated by spaces (the stream joins a step's entries of one kind by concatenation)."""

from __future__ import annotations

import base64
import math
import sys
from array import array
from collections.abc import Iterator
from typing import TYPE_CHECKING

from ponder.engine.outputs import TokenLogprob

if TYPE_CHECKING:  # (the tokenizers library: the webhooks worker shows jobs without it)
    from ponder.engine.tokenizer import Tokenizer

# 2 Mi values: 16 MiB packed; R1's 32K-token budget with top_logprobs 20 and n 3 fits.
MAX_LOGPROB_VALUES = 1 << 21
# OpenAI's logprob for a token it has no value for (here: a thinking budget's forced end tag that
# max_tokens cut off before the model ran on it)
UNKNOWN_LOGPROB = -9999.0
NO_TOKEN = -1


def logprob_values(max_tokens: int, n: int, top_logprobs: int) -> int:
    """How many values a job that asks for log probabilities may keep."""
    return max_tokens * n * (1 + top_logprobs)


def pack(values: list[TokenLogprob], k: int) -> str:
    """A run of tokens' values as one string (see the module's docstring)."""
    run = PackedRun(k)
    run.extend(values)
    return run.packed()


class PackedRun:
    """A run of tokens' values that grows as they come, each value converted once: a long job's
    progress flushes write its whole run every time, and then pay a base64 of its bytes, not a
    Python loop over every value so far."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.ids, self.logprobs = array("i"), array("f")

    def extend(self, values: list[TokenLogprob]) -> None:
        for value in values:
            top = list(value.top[: self.k]) + [(NO_TOKEN, math.nan)] * (self.k - len(value.top))
            self.ids.extend([value.token_id, *(token for token, _ in top)])
            self.logprobs.extend([math.nan if value.logprob is None else value.logprob, *(lp for _, lp in top)])

    def packed(self) -> str:
        ids, logprobs = array("i", self.ids), array("f", self.logprobs)  # copies: the byte order is the wire's
        _little_endian(ids, logprobs)
        return f"{self.k}:{_b64(ids)}:{_b64(logprobs)}"


def unpack(packed: str) -> list[TokenLogprob]:
    k_text, ids_text, values_text = packed.split(":")
    k = int(k_text)
    ids, values = array("i", base64.b64decode(ids_text)), array("f", base64.b64decode(values_text))
    _little_endian(ids, values)
    width = 1 + k
    return [
        TokenLogprob(
            token_id=ids[at],
            logprob=None if math.isnan(values[at]) else values[at],
            top=tuple((ids[i], values[i]) for i in range(at + 1, at + width) if ids[i] != NO_TOKEN),
        )
        for at in range(0, len(ids), width)
    ]


def stream_segment(first: int, values: list[TokenLogprob], k: int) -> str:
    """A stream entry's piece: `values` of the sample's tokens from position `first` on."""
    return f"{first}@{pack(values, k)} "


def stream_segments(delta: str) -> Iterator[tuple[int, list[TokenLogprob]]]:
    """(first position, values) of each piece a stream's `logprobs` delta holds."""
    for segment in delta.split():
        first, _, packed = segment.partition("@")
        yield int(first), unpack(packed)


def chat_entries(values: list[TokenLogprob], tokenizer: Tokenizer) -> list[dict]:
    """OpenAI's chat `logprobs.content`: each token with its log probability, its bytes and its
    top alternatives (`top_logprobs` of them: the request's)."""
    return [
        _chat_entry(value.token_id, value.logprob, tokenizer)
        | {"top_logprobs": [_chat_entry(token, logprob, tokenizer) for token, logprob in value.top]}
        for value in values
    ]


def token_text(token_id: int, tokenizer: Tokenizer) -> str:
    """A token as text; bytes that are part of a character are shown escaped (`\\xe4`), as OpenAI's are."""
    return tokenizer.token_bytes(token_id).decode("utf-8", errors="backslashreplace")


def _chat_entry(token_id: int, logprob: float | None, tokenizer: Tokenizer) -> dict:
    return {
        "token": token_text(token_id, tokenizer),
        "logprob": UNKNOWN_LOGPROB if logprob is None else logprob,
        "bytes": list(tokenizer.token_bytes(token_id)),
    }


def _little_endian(*arrays: array) -> None:
    """Packed values are little-endian on every machine (in place: its own inverse)."""
    if sys.byteorder != "little":
        for values in arrays:
            values.byteswap()


def _b64(values: array) -> str:
    return base64.b64encode(values.tobytes()).decode("ascii")
