"""The Responses API's reasoning without the stack: the reasoning sealed for its round trip
(AES-SIV under a key HKDF derives from PONDER_SECRET_KEY, apart from the key of secrets at rest),
opened again, refused when altered or made under another key, opened through a rotation; an item
passed back is checked and dropped; the summary is the reasoning's last paragraph."""

from __future__ import annotations

import base64
import string

import pytest
from cryptography.fernet import Fernet
from cryptography.hazmat.primitives.ciphers.aead import AESSIV

from ponder.service.encryption import (
    KDF_INFO,
    REASONING_KDF_INFO,
    UnopenableReasoning,
    derive_key,
    derived_bytes,
    open_reasoning,
    seal_reasoning,
)
from ponder.service.errors import InvalidRequest
from ponder.service.openai.reasoning_items import (
    ReasoningItem,
    ReasoningText,
    check_sealed,
    last_paragraph,
    shown_reasoning,
)
from ponder.service.openai.response_schemas import ResponseCreate
from ponder.service.openai.responses import job_request
from ponder.service.settings import Settings

FIRST, SECOND = "first-secret-key-" + "a" * 20, "second-secret-key-" + "b" * 20
TEXT = "The sky scatters blue light.\n\nSo: Rayleigh scattering. ✓"


def settings(secret_key: str = FIRST, previous: tuple[str, ...] = ()) -> Settings:
    return Settings(model="tiny-llama", secret_key=secret_key, previous_secret_keys=previous, _env_file=None)


def flipped(token: str, at: int) -> str:
    return token[:at] + ("B" if token[at] == "A" else "A") + token[at + 1 :]


def test_sealed_reasoning_opens_to_its_text_and_is_the_same_token_each_time():
    token = seal_reasoning(TEXT, settings())
    assert open_reasoning(token, settings()) == TEXT
    assert seal_reasoning(TEXT, settings()) == token  # deterministic: every reading shows the same
    assert "Rayleigh" not in token and base64.urlsafe_b64decode(token)  # URL-safe base64, no plain text
    # AES-256-SIV under HKDF(PONDER_SECRET_KEY, info "ponder reasoning items v1"), nothing else
    key = derived_bytes(FIRST, REASONING_KDF_INFO, length=64)
    assert AESSIV(key).decrypt(base64.urlsafe_b64decode(token), None).decode() == TEXT
    # one secret, two unrelated keys: the reasoning's is not the one of secrets at rest
    assert derived_bytes(FIRST, KDF_INFO) not in key and base64.urlsafe_b64decode(derive_key(FIRST)) not in key
    with pytest.raises(UnopenableReasoning):
        open_reasoning(Fernet(derive_key(FIRST)).encrypt(TEXT.encode()).decode(), settings())


def test_an_altered_token_does_not_open():
    token = seal_reasoning(TEXT, settings())
    for at in (0, len(token) // 2, len(token) - 2, len(token) - 1):
        with pytest.raises(UnopenableReasoning, match="altered"):
            open_reasoning(flipped(token, at), settings())
    # The last character's unused low bits (before the padding): the same bytes, still refused.
    alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
    assert token.endswith("=") and not token.endswith("==")  # 2 unused bits
    data = token.rstrip("=")
    twin = data[:-1] + alphabet[alphabet.index(data[-1]) ^ 1] + "="
    assert base64.urlsafe_b64decode(twin) == base64.urlsafe_b64decode(token)
    with pytest.raises(UnopenableReasoning):
        open_reasoning(twin, settings())
    for altered in (token[:-4], token + "AAAA", token + "\n", "!" + token, "", "not base64 at all?"):
        with pytest.raises(UnopenableReasoning):
            open_reasoning(altered, settings())


def test_a_token_of_another_key_opens_only_while_that_key_is_a_previous_one():
    token = seal_reasoning(TEXT, settings(FIRST))
    with pytest.raises(UnopenableReasoning, match="another key"):
        open_reasoning(token, settings(SECOND))
    assert open_reasoning(token, settings(SECOND, previous=(FIRST,))) == TEXT  # rotated: still opens
    assert seal_reasoning(TEXT, settings(SECOND, previous=(FIRST,))) == seal_reasoning(TEXT, settings(SECOND))


def test_an_item_passed_back_is_checked_and_dropped():
    token = seal_reasoning(TEXT, settings())
    item = {"type": "reasoning", "id": "rs_1", "summary": [], "encrypted_content": token, "status": "completed"}
    body = ResponseCreate(model="tiny-llama", input=[{"role": "user", "content": "hi"}, item, item])
    assert [m.content for m in job_request(body, settings()).messages or []] == ["hi"]  # earlier thinking dropped
    altered = body.input[2].model_copy(update={"encrypted_content": flipped(token, 9)})
    with pytest.raises(InvalidRequest) as raised:  # the second item altered: named by its place
        check_sealed([*body.input[:2], altered], settings())
    assert raised.value.param == "input.2.encrypted_content" and raised.value.code == "invalid_encrypted_content"
    with pytest.raises(InvalidRequest) as raised:
        job_request(body, settings(SECOND))
    assert raised.value.param == "input.1.encrypted_content"


@pytest.mark.parametrize(
    ("text", "summary"),
    [
        (TEXT, "So: Rayleigh scattering. ✓"),
        ("one line", "one line"),
        ("  first\nstill first  \n \n\n second\n", "second"),
        ("last words\n\n   \n", "last words"),
        (" \n\n ", ""),
    ],
)
def test_the_summary_is_the_last_paragraph(text, summary):
    assert last_paragraph(text) == summary


def test_an_item_shows_its_summary_and_sealed_text_once_the_reasoning_has_ended():
    shown = {"reasoning": {"effort": "low", "summary": "detailed"}, "include": ["reasoning.encrypted_content"]}
    item = ReasoningItem(id="rs_1", content=[ReasoningText(text=TEXT)], status="completed")
    ended = shown_reasoning(item, shown, settings())
    assert [(part.type, part.text) for part in ended.summary] == [("summary_text", "So: Rayleigh scattering. ✓")]
    assert ended.encrypted_content and open_reasoning(ended.encrypted_content, settings()) == TEXT
    assert shown_reasoning(item.model_copy(update={"status": "incomplete"}), shown, settings()) == ended.model_copy(
        update={"status": "incomplete"}
    )
    in_progress = item.model_copy(update={"status": "in_progress"})
    assert shown_reasoning(in_progress, shown, settings()) == in_progress  # nothing while it is still thinking
    deprecated = shown_reasoning(item, {"reasoning": {"generate_summary": "auto"}}, settings())
    assert deprecated.summary == ended.summary and deprecated.encrypted_content is None
    assert shown_reasoning(item, {"reasoning": {"effort": "low"}}, settings()) == item  # neither asked for
