"""Incremental detokenisation on its own: held-back bytes and stop strings."""

from ponder.engine.detokenizer import IncrementalDetokenizer
from ponder.engine.model_store import resolve_model
from ponder.engine.tokenizer import Tokenizer


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(resolve_model("tiny-llama"))


def feed_one_by_one(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = [detok.add_tokens([i]) for i in ids]
    return [*deltas, detok.finish()]


def test_multibyte_characters_wait_for_their_last_byte():
    tok = tiny_tokenizer()
    ids = list("a€b".encode())  # € is three bytes
    deltas = feed_one_by_one(IncrementalDetokenizer(tok, [65]), ids)
    assert deltas[:5] == ["a", "", "", "€", "b"]
    assert "".join(deltas) == "a€b"


def test_stop_string_is_cut_and_held_back():
    tok = tiny_tokenizer()
    detok = IncrementalDetokenizer(tok, [65], stop=["STOP"])
    deltas = feed_one_by_one(detok, list(b"hello STOP world"))
    assert detok.stopped_by == "STOP"
    assert "".join(deltas) == "hello " == detok.text
    assert all("S" not in d for d in deltas)


def test_incomplete_bytes_at_the_end_are_flushed():
    tok = tiny_tokenizer()
    deltas = feed_one_by_one(IncrementalDetokenizer(tok, [65]), [0x61, 0xE2, 0x82])  # "a" + 2 of 3 bytes
    assert deltas[0] == "a" and deltas[1] == deltas[2] == ""
    assert "".join(deltas) == tok.decode([0x61, 0xE2, 0x82])
