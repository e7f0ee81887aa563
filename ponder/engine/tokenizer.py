"""Tokenizers without torch: HF `tokenizer.json` + `tokenizer_config.json`, or a GGUF's metadata.

The API process uses this to render chat templates and count prompt tokens, so nothing here may
import torch or transformers.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as FastTokenizer

from ponder.engine.errors import ModelLoadError

# Split patterns llama.cpp names in `tokenizer.ggml.pre`; anything else uses GPT-2's own regex.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
GGUF_SPLITS = {
    "llama3": _LLAMA3_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


@dataclass
class Tokenizer:
    """A fast tokenizer plus the special tokens and chat template that config files carry."""

    backend: FastTokenizer
    bos_token: str | None = None
    eos_token: str | None = None
    add_bos_token: bool = False
    chat_template: str | None = None
    extra_eos_token_ids: list[int] = field(default_factory=list)
    _token_bytes: dict[int, bytes] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if path.suffix == ".gguf":
            return cls.from_gguf(path)
        return cls.from_hf_dir(path)

    @classmethod
    def from_hf_dir(cls, directory: Path) -> Tokenizer:
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise ModelLoadError(f"{tokenizer_file}: tokenizer.json not found")
        try:
            backend = FastTokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # the tokenizers library raises a bare Exception on bad JSON
            raise ModelLoadError(f"{tokenizer_file}: cannot parse tokenizer ({e})") from e
        config = _read_json(directory / "tokenizer_config.json") or {}
        return cls(
            backend=backend,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=_chat_template(config) or _chat_template_file(directory),
        )

    @classmethod
    def from_gguf(cls, path: Path) -> Tokenizer:
        from ponder.engine.gguf_file import metadata

        meta = metadata(path)
        kind = meta.get("tokenizer.ggml.model")
        if kind != "gpt2":
            raise ModelLoadError(f"{path}: GGUF tokenizer {kind!r} is not supported (only byte-level BPE 'gpt2')")
        tokens: list[str] = meta["tokenizer.ggml.tokens"]
        backend = _byte_level_bpe(tokens, meta.get("tokenizer.ggml.merges") or [], meta.get("tokenizer.ggml.pre"))
        _add_gguf_special_tokens(backend, tokens, meta.get("tokenizer.ggml.token_type") or [])

        def token(key: str) -> str | None:
            token_id = meta.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None else None

        return cls(
            backend=backend,
            bos_token=token("bos_token_id"),
            eos_token=token("eos_token_id"),
            add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=meta.get("tokenizer.chat_template"),
        )

    # -- ids ---------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self.bos_token)

    @property
    def eos_token_ids(self) -> list[int]:
        ids = [self.token_to_id(self.eos_token), *self.extra_eos_token_ids]
        return list(dict.fromkeys(i for i in ids if i is not None))

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        bos = self.bos_token_id
        if add_special_tokens and self.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        return ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (OpenAI's logprobs `bytes`): a piece of a multi-byte
        character may be a token of its own, so these need not be UTF-8. b"" for an id past the
        tokenizer's vocabulary (a model's padded rows)."""
        if (known := self._token_bytes.get(token_id)) is None:
            known = self._token_bytes[token_id] = self._spelled_bytes(token_id)
        return known

    def _spelled_bytes(self, token_id: int) -> bytes:
        token = self.backend.id_to_token(token_id)
        if token is None:
            return b""
        if token_id in self.backend.get_added_tokens_decoder():  # added tokens are spelled as they read
            return token.encode()
        if isinstance(self.backend.decoder, decoders.ByteLevel) and set(token) <= _BYTE_OF_CHAR.keys():
            return bytes(_BYTE_OF_CHAR[char] for char in token)
        if (byte := _BYTE_FALLBACK.fullmatch(token)) is not None:  # SentencePiece's <0xNN>
            return bytes([int(byte.group(1), 16)])
        return token.replace("\u2581", " ").encode()  # SentencePiece's word boundary

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any
    ) -> str:
        """The prompt text for a conversation, rendered like transformers does."""
        from ponder.engine.chat import render_chat_template

        return render_chat_template(
            self.chat_template,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
            **kwargs,
        )

    def encode_chat(self, messages: list[dict[str, Any]], **kwargs: Any) -> list[int]:
        # The template writes BOS itself, so no special tokens are added on top (as transformers does).
        return self.encode(self.apply_chat_template(messages, **kwargs), add_special_tokens=False)


def _byte_level_bpe(tokens: list[str], merges: list[str], pre: str | None) -> FastTokenizer:
    """The byte-level BPE a GGUF describes, built the way transformers builds it from the same file."""
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab = {
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i for i, t in enumerate(tokens)
    }
    pairs = [(left, right) for left, _, right in (m.partition(" ") for m in merges)]
    backend = FastTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False))
    split = GGUF_SPLITS.get(pre or "")
    if split:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend


def _add_gguf_special_tokens(backend: FastTokenizer, tokens: list[str], token_types: list[int]) -> None:
    """Control tokens become special; user-defined ones (like `<think>`) are matched whole."""
    alphabet = set(bytes_to_unicode().values())
    control = [
        AddedToken(t, special=True, normalized=False)
        for t, kind in zip(tokens, token_types, strict=False)
        if kind == _GGUF_CONTROL and set(t) <= alphabet
    ]
    user = [
        AddedToken(t, special=False, normalized=False)
        for t, kind in zip(tokens, token_types, strict=False)
        if kind == _GGUF_USER_DEFINED
    ]
    backend.add_special_tokens(control)
    backend.add_tokens(user)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


_BYTE_OF_CHAR = {char: byte for byte, char in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _read_json(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{path}: not valid JSON: {e}") from e


def _token_text(value: Any) -> str | None:
    """tokenizer_config writes special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _chat_template(config: dict[str, Any]) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        named = {t.get("name"): t.get("template") for t in template}
        return named.get("default") or next(iter(named.values()), None)
    return template


def _chat_template_file(directory: Path) -> str | None:
    path = directory / "chat_template.jinja"
    return path.read_text() if path.is_file() else None
