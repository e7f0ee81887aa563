"""Secrets at rest: webhook signing secrets are stored encrypted, with Fernet (AES-128-CBC with
an HMAC-SHA256 tag, from `cryptography`) under a key derived from PONDER_SECRET_KEY by HKDF. A
copy of the database alone (a backup, a replica, a leaked dump) then signs nothing.

Rotating PONDER_SECRET_KEY: set it to the new value and PONDER_PREVIOUS_SECRET_KEYS to the old
one (comma-separated if several). Reads decrypt with any of them (MultiFernet), writes use the new
one; `ponder secrets reencrypt` rewrites every stored secret under the new key, after which the
old one can be dropped from PONDER_PREVIOUS_SECRET_KEYS.
"""

from __future__ import annotations

import base64
from functools import lru_cache

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from sqlalchemy import Text
from sqlalchemy.types import TypeDecorator

# Distinguishes this use of PONDER_SECRET_KEY from any other key derived from it later.
KDF_INFO = b"ponder secrets at rest v1"


class UndecryptableSecret(Exception):
    """A stored secret none of the configured keys opens."""


def derive_key(secret_key: str) -> bytes:
    """The Fernet key for one PONDER_SECRET_KEY (PONDER_SECRET_KEY is a random secret, so one HKDF
    step suffices; no password stretching)."""
    raw = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=KDF_INFO).derive(secret_key.encode())
    return base64.urlsafe_b64encode(raw)


@lru_cache(maxsize=4)
def _box(secret_key: str, previous_keys: tuple[str, ...]) -> MultiFernet:
    return MultiFernet([Fernet(derive_key(key)) for key in (secret_key, *previous_keys)])


def secret_box() -> MultiFernet:
    """Encrypts with PONDER_SECRET_KEY, decrypts with it or any of PONDER_PREVIOUS_SECRET_KEYS."""
    from ponder.service.settings import get_settings

    settings = get_settings()
    return _box(settings.secret_key, settings.previous_secret_keys)


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


class EncryptedText(TypeDecorator):
    """A column whose Python value is the plaintext and whose stored value is its Fernet token."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: str | None, dialect) -> str | None:
        return None if value is None else encrypt(value)

    def process_result_value(self, value: str | None, dialect) -> str | None:
        return None if value is None else decrypt(value)
