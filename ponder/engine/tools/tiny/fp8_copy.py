"""An FP8 checkpoint dequantised to a plain one: the reference transformers runs for tiny-r1-fp8."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from ponder.engine.checkpoint import INDEX_FILE, SCALE_SUFFIX, fp8_block_size
from ponder.engine.tools.tiny.specs import MARKER
from ponder.engine.tools.tiny.weights import write_weights


def write_dequantized_copy(source: Path, destination: Path) -> Path:
    """`source` (an FP8 checkpoint) as a plain one: every float8 weight times its scale, in fp32;
    other tensors as stored; one safetensors file; no quantization_config. Transformers runs it
    as the reference on exactly the weights an FP8 load should produce. Small models only: every
    tensor is held at once."""
    from safetensors.torch import load_file

    from ponder.engine.runtime.fp8 import FP8_DTYPE, dequantize_block_fp8

    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    config = json.loads((source / "config.json").read_text())
    block = fp8_block_size(config)
    config.pop("quantization_config", None)
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if tensor.dtype == FP8_DTYPE:
            tensor = dequantize_block_fp8(tensor, tensors[name + SCALE_SUFFIX], block)
        plain[name] = tensor
    config["torch_dtype"] = "float32"
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    for item in sorted(source.iterdir()):
        if item.suffix != ".safetensors" and item.name not in ("config.json", INDEX_FILE, MARKER) and item.is_file():
            shutil.copyfile(item, destination / item.name)
    write_weights(destination, plain, 1)
    return destination
