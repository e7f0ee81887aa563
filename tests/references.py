"""transformers' side of the comparisons, loaded fast. transformers reads a GGUF file slowly (~17 s
for SmolLM2-135M's on one core: its GGUF reader parses the tokenizer's arrays element by element and
builds a tensor-name map per tensor), and several test modules in each test process load the same
reference. So a GGUF model's transformers form (its dequantised weights and converted tokenizer,
exactly what `from_pretrained(..., gguf_file=...)` gives) is saved once beside the GGUF file in the
model cache, and later loads read that."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch

from ponder.engine.model_store import resolve_model

CONVERTED_DIR = "transformers-fp32"  # beside the GGUF file, in the model cache


def reference_dir(alias: str) -> Path:
    """A directory transformers' from_pretrained() reads the model `alias` from: the model's own
    for a transformers checkpoint; for a GGUF file, its conversion (made once per model cache)."""
    path = resolve_model(alias)
    if path.suffix != ".gguf":
        return path
    target = path.parent / CONVERTED_DIR
    if not (target / "config.json").exists():
        _convert(path, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Loaded from GGUF the weights are plain fp32 already; the quantizer left on the model only
    # refuses save_pretrained().
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Written aside, then renamed: another test process may convert the same model at once.
    staging = Path(tempfile.mkdtemp(prefix=f".{CONVERTED_DIR}-", dir=gguf.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.rename(staging, target)
    except OSError:  # the other process was first: its copy is the same
        shutil.rmtree(staging, ignore_errors=True)
