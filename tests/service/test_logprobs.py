"""Kept log probabilities (ponder/service/logprobs.py): packed exactly (float32 values, as the
engine computes them), a run's stream segments read back in order, and tokens spelled by their
bytes (a character split over tokens shows escaped)."""

from __future__ import annotations

import struct

from ponder.engine.model_store import resolve_model
from ponder.engine.outputs import TokenLogprob
from ponder.engine.tokenizer import Tokenizer
from ponder.service.logprobs import (
    UNKNOWN_LOGPROB,
    PackedRun,
    chat_entries,
    pack,
    stream_segment,
    stream_segments,
    unpack,
)


def f32(value: float) -> float:
    return struct.unpack("<f", struct.pack("<f", value))[0]


VALUES = [
    TokenLogprob(7, f32(-0.25), 1, ((7, f32(-0.25)), (3, f32(-1.5)))),
    TokenLogprob(9, f32(-3.125), 4, ((1, f32(-0.5)), (2, f32(-0.75)))),
    TokenLogprob(5, None),  # a forced tag max_tokens cut off: no value, no alternatives
]


def test_pack_keeps_every_value_exactly():
    assert unpack(pack(VALUES, 2)) == [TokenLogprob(v.token_id, v.logprob, None, v.top) for v in VALUES]
    assert unpack(pack([], 20)) == []
    assert unpack(pack(VALUES[:1], 0)) == [TokenLogprob(7, f32(-0.25))]


def test_a_run_grown_piece_by_piece_packs_as_the_whole_does():
    run = PackedRun(2)
    for value in VALUES:
        run.extend([value])
        assert run.packed() == pack(VALUES[: VALUES.index(value) + 1], 2)


def test_stream_segments_joined_read_back_in_order():
    delta = stream_segment(0, VALUES[:2], 2) + stream_segment(2, VALUES[2:], 2)
    assert [(first, len(values)) for first, values in stream_segments(delta)] == [(0, 2), (2, 1)]


def test_tokens_are_spelled_by_their_bytes():
    tokenizer = Tokenizer.from_pretrained(resolve_model("tiny-qwen2"))  # byte-level: é is two tokens
    ids = tokenizer.encode("é", add_special_tokens=False)
    entries = chat_entries(
        [TokenLogprob(i, -1.0, top=((i, -1.0),)) for i in ids] + [TokenLogprob(ids[0], None)], tokenizer
    )
    assert b"".join(bytes(e["bytes"]) for e in entries[:-1]).decode() == "é"
    assert [e["token"] for e in entries[:-1]] == ["\\xc3", "\\xa9"]
    assert entries[0]["top_logprobs"] == [{"token": "\\xc3", "logprob": -1.0, "bytes": [0xC3]}]
    assert entries[-1]["logprob"] == UNKNOWN_LOGPROB and entries[-1]["top_logprobs"] == []
