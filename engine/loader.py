"""Weights from checkpoints: HF safetensors (one file, or shards with an index) and GGUF files.

Tensors stream one at a time into the model's parameters (packed q|k|v and gate|up are filled
shard by shard), so no second full copy of the weights is ever held. Every failure names the file
and, where there is one, the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.layers.linear import ShapeMismatch, default_weight_loader
from engine.models import get_model_class

INDEX_FILE = "model.safetensors.index.json"


def load_model(path: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device, max_position: int):
    model_class = get_model_class(config.model_type)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = model_class(config, max_position)
    finally:
        torch.set_default_dtype(previous)
    load_weights(model, iter_checkpoint(Path(path), config), source=str(path))
    for module in model.modules():
        if hasattr(module, "prepack"):
            module.prepack()
    return model.eval()


def load_weights(model: nn.Module, tensors: Iterator[tuple[str, str, torch.Tensor]], source: str) -> None:
    params = dict(model.named_parameters())
    expected = {(name, shard) for name, shard in _expected_shards(model)}
    loaded: set[tuple[str, str | None]] = set()
    for file, name, tensor in tensors:
        if model.checkpoint_skips(name):
            continue
        target, shard = _parameter_for(model, name)
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"{file}: tensor {name}: not a parameter of {type(model).__name__}")
        loader = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor.to(param.dtype), shard)
        except ShapeMismatch as e:
            raise ModelLoadError(f"{file}: tensor {name}: {e}") from e
        loaded.add((target, shard))
    missing = sorted(f"{name}[{shard}]" if shard else name for name, shard in expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source}: checkpoint lacks tensors: {shown}")


def _parameter_for(model: nn.Module, name: str) -> tuple[str, str | None]:
    """Checkpoint name -> (parameter name, shard of a packed parameter or None)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part in model.packed_modules:
            packed, shard = model.packed_modules[part]
            return ".".join([*parts[:i], packed, *parts[i + 1 :]]), shard
    return name, None


def _expected_shards(model: nn.Module) -> Iterator[tuple[str, str | None]]:
    canonical = {id(p): name for name, p in model.named_parameters()}  # a tied weight has one name
    for module in model.modules():
        for param in module.parameters(recurse=False):
            shards = getattr(module, "shard_offsets", None) or {None: None}
            for shard in shards:
                yield canonical[id(param)], shard


def iter_checkpoint(path: Path, config: ModelConfig) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file, tensor name, tensor) for every tensor of the checkpoint."""
    if path.suffix == ".gguf":
        from engine.gguf_file import iter_gguf_tensors

        for name, array in iter_gguf_tensors(path, config.extra):
            yield str(path), name, torch.from_numpy(array)
        return
    for file in safetensors_files(path):
        yield from _iter_safetensors(file)


def safetensors_files(directory: Path) -> list[Path]:
    if not directory.is_dir():
        raise ModelLoadError(f"{directory}: model directory not found")
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ModelLoadError(f"{index}: not a valid safetensors index ({e})") from e
        files = [directory / f for f in dict.fromkeys(weight_map.values())]
        for file in files:
            if not file.is_file():
                raise ModelLoadError(f"{file}: shard listed in {INDEX_FILE} is missing")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no *.safetensors weights found")
    return files


def _iter_safetensors(file: Path) -> Iterator[tuple[str, str, torch.Tensor]]:
    try:
        with safe_open(file, framework="pt") as f:
            names = list(f.keys())
            for name in names:
                yield str(file), name, _get_tensor(f, file, name)
    except SafetensorError as e:
        raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _get_tensor(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, RuntimeError) as e:
        raise ModelLoadError(f"{file}: tensor {name}: unreadable ({e})") from e
