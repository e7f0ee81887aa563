"""Secrets at rest: webhook signing secrets are stored encrypted, with Fernet (AES-128-CBC with
an HMAC-SHA256 tag, from `cryptography`) under a key derived from PONDER_SECRET_KEY by HKDF. A
copy of the database alone (a backup, a replica, a leaked dump) then signs nothing.

Rotating PONDER_SECRET_KEY: set it to the new value and PONDER_PREVIOUS_SECRET_KEYS to the old
one (comma-separated if several). Reads decrypt with any of them (MultiFernet), writes use the new
one; `ponder secrets reencrypt` rewrites every stored secret under the new key, after which the
old one can be dropped from PONDER_PREVIOUS_SECRET_KEYS.

Reasoning sealed for its round trip (the Responses API's `include: ["reasoning.encrypted_content"]`):
a reasoning item's text is sealed with AES-SIV under a second key derived from the same
PONDER_SECRET_KEY (another HKDF `info`, so the two keys differ and neither opens the other's
tokens), and a token a client sends back is opened under PONDER_SECRET_KEY or any of
PONDER_PREVIOUS_SECRET_KEYS. AES-SIV rather than Fernet because it is deterministic: the same text
under the same key is the same token, so a response read again (GET, a replayed stream, a batch
line) shows the same `encrypted_content`, as every other field of it.
"""

from __future__ import annotations

import base64
from functools import lru_cache
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidTag
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Text
from sqlalchemy.types import TypeDecorator

if TYPE_CHECKING:
    from ponder.service.settings import Settings

# Each use of PONDER_SECRET_KEY derives its own key with its own HKDF `info`.
KDF_INFO = b"ponder secrets at rest v1"
REASONING_KDF_INFO = b"ponder reasoning items v1"


class UndecryptableSecret(Exception):
    """A stored secret none of the configured keys opens."""


def derived_bytes(secret_key: str, info: bytes, length: int = 32) -> bytes:
    """Key material for one use (`info`) of one PONDER_SECRET_KEY: uses with different `info` get
    unrelated keys. PONDER_SECRET_KEY is a random secret, so one HKDF step suffices; no password
    stretching."""
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(secret_key.encode())


def derive_key(secret_key: str) -> bytes:
    """The Fernet key of secrets at rest for one PONDER_SECRET_KEY."""
    return base64.urlsafe_b64encode(derived_bytes(secret_key, KDF_INFO))


def configured_keys(settings: Settings) -> tuple[str, ...]:
    """PONDER_SECRET_KEY, then PONDER_PREVIOUS_SECRET_KEYS: the first makes tokens, any opens them."""
    return (settings.secret_key, *settings.previous_secret_keys)


@lru_cache(maxsize=4)
def _box(keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(derive_key(key)) for key in keys])


def secret_box() -> MultiFernet:
    """Encrypts with PONDER_SECRET_KEY, decrypts with it or any of PONDER_PREVIOUS_SECRET_KEYS."""
    from ponder.service.settings import get_settings

    return _box(configured_keys(get_settings()))


def encrypt(plaintext: str) -> str:
    return secret_box().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    try:
        return secret_box().decrypt(token.encode()).decode()
    except InvalidToken as e:
        raise UndecryptableSecret(
            "a stored secret cannot be decrypted with PONDER_SECRET_KEY: if the key was changed, list "
            "the old one in PONDER_PREVIOUS_SECRET_KEYS"
        ) from e


class UnopenableReasoning(ValueError):
    """A sealed reasoning token none of the configured keys opens: altered, or made under another
    key (another deployment's, or one dropped from PONDER_PREVIOUS_SECRET_KEYS)."""


@lru_cache(maxsize=8)
def _reasoning_cipher(secret_key: str) -> AESSIV:
    return AESSIV(derived_bytes(secret_key, REASONING_KDF_INFO, length=64))  # AES-256-SIV


def seal_reasoning(text: str, settings: Settings) -> str:
    """The text sealed under PONDER_SECRET_KEY's reasoning key, as URL-safe base64; deterministic."""
    sealed = _reasoning_cipher(settings.secret_key).encrypt(text.encode(), None)
    return base64.urlsafe_b64encode(sealed).decode()


def open_reasoning(token: str, settings: Settings) -> str:
    """The text `seal_reasoning` sealed, under any configured key. Only the canonical encoding of
    a token opens: a changed padding bit would otherwise decode to the same bytes."""
    try:
        sealed = base64.urlsafe_b64decode(token.encode())
    except ValueError as e:
        raise UnopenableReasoning("not a token this server made (not base64)") from e
    if base64.urlsafe_b64encode(sealed).decode() == token:
        for key in configured_keys(settings):
            try:
                return _reasoning_cipher(key).decrypt(sealed, None).decode()
            except InvalidTag:
                continue
    raise UnopenableReasoning("not a token this server made: altered, or sealed under another key")


class EncryptedText(TypeDecorator):
    """A column whose Python value is the plaintext and whose stored value is its Fernet token."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        return None if value is None else encrypt(value)

    def process_result_value(self, value: str | None, dialect) -> str | None:
        return None if value is None else decrypt(value)
