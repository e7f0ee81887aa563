"""Weights from checkpoints: HF safetensors (one file, or shards with an index) and GGUF files.

Tensors stream one at a time into the model's parameters (packed q|k|v and gate|up are filled
shard by shard), so no second full copy of the weights is ever held. FP8 weights (float8_e4m3fn with
a `weight_scale_inv` sibling, docs/architecture.md#fp8-weights) are dequantised on the way, one tensor at a time. Every
failure names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ponder.engine.checkpoint import INDEX_FILE, SCALE_SUFFIX, fp8_block_size, keeps_fp8
from ponder.engine.config import EngineConfig, ModelConfig
from ponder.engine.errors import ModelLoadError
from ponder.engine.runtime.fp8 import BLOCK_SIZE, FP8_DTYPE, Block, dequantize_block_fp8
from ponder.engine.runtime.layers.linear import ShapeMismatch, default_weight_loader
from ponder.engine.runtime.models import get_model_class
from ponder.engine.runtime.models.base import CausalLM, packed_parameter


def load_model(
    path: Path,
    config: ModelConfig,
    dtype: torch.dtype,
    device: torch.device,
    max_position: int,
    fp8_weights: str = EngineConfig.fp8_weights,
    mtp: bool = False,
):
    """`fp8_weights` (EngineConfig's, and its default): "keep" holds an FP8 checkpoint's linears in
    FP8 (see `keeps_fp8`), "dequantize" dequantises them while loading, "auto" keeps them on CUDA only.
    `mtp` loads the multi-token-prediction layer too (DeepSeek-V3's speculative drafter)."""
    model_class = get_model_class(config.model_type)
    keep = keeps_fp8(config.model_type, config.extra, device.type, fp8_weights)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            # Only the models that have them take these options (Llama/Qwen2 have neither).
            options = {"fp8": True} if keep else {}
            options |= {"mtp": True} if mtp else {}
            model = model_class(config, max_position, **options)
    finally:
        torch.set_default_dtype(previous)
    # Tensors the model skips (another rank's experts, the MTP layer) are never read.
    tensors = iter_checkpoint(Path(path), config, dtype=dtype, dequantize_fp8=not keep, skip=model.checkpoint_skips)
    load_weights(model, tensors, source=str(path))
    for module in model.modules():
        if hasattr(module, "prepack"):
            module.prepack()
    return model.eval()


def load_weights(model: CausalLM, tensors: Iterator[tuple[str, str, torch.Tensor]], source: str) -> None:
    params = dict(model.named_parameters())
    expected = set(_expected_shards(model))
    loaded: set[tuple[str, object]] = set()
    for file, name, tensor in tensors:
        if model.checkpoint_skips(name):
            continue
        target, shard = _parameter_for(model, name)
        param = params.get(target)
        if param is None:
            raise ModelLoadError(f"{file}: tensor {name}: not a parameter of {type(model).__name__}")
        loader: Callable[..., None] = getattr(param, "weight_loader", default_weight_loader)
        try:
            loader(param, tensor.to(param.dtype), shard)
        except ShapeMismatch as e:
            raise ModelLoadError(f"{file}: tensor {name}: {e}") from e
        loaded.add((target, shard))
    missing = sorted(f"{name}[{shard}]" if shard else name for name, shard in expected - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ModelLoadError(f"{source}: checkpoint lacks tensors: {shown}")


def _parameter_for(model: CausalLM, name: str) -> tuple[str, object]:
    """Checkpoint name -> (parameter name, shard of a packed parameter or None). A model whose
    parameters pack more than whole projections (stacked experts) maps names itself (`parameter_for`);
    any model the loader takes names its packed projections in `packed_modules`."""
    custom = getattr(model, "parameter_for", None)
    return custom(name) if custom is not None else packed_parameter(model.packed_modules, name)


def _expected_shards(model: nn.Module) -> Iterator[tuple[str, object]]:
    canonical = {id(p): name for name, p in model.named_parameters()}  # a tied weight has one name
    for module in model.modules():
        for param in module.parameters(recurse=False):
            shards = getattr(param, "expected_shards", None) or getattr(module, "shard_offsets", None) or {None: None}
            for shard in shards:
                yield canonical[id(param)], shard


def iter_checkpoint(
    path: Path,
    config: ModelConfig,
    dtype: torch.dtype = torch.float32,
    dequantize_fp8: bool = True,
    skip: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(file, tensor name, tensor) for every tensor of the checkpoint, file by file. FP8 weights come
    dequantised to `dtype` and their scales are consumed; with `dequantize_fp8=False` (for a model
    that runs FP8 itself) both the float8 weight and its `weight_scale_inv` pass through as stored.
    Safetensors names for which `skip` is true are passed over unread (a GGUF file is read whole)."""
    if path.suffix == ".gguf":
        from ponder.engine.gguf_file import iter_gguf_tensors

        for name, array in iter_gguf_tensors(path, config.extra):
            yield str(path), name, torch.from_numpy(array)
        return
    shards = Shards(path, safetensors_files(path))
    try:
        tensors = shards.tensors(skip)
        if dequantize_fp8:
            tensors = dequantize_fp8_stream(tensors, shards, dtype, fp8_block_size(config.extra))
        yield from tensors
    finally:
        shards.close()


def dequantize_fp8_stream(
    tensors: Iterator[tuple[str, str, torch.Tensor]],
    shards: Shards,
    dtype: torch.dtype,
    block_size: Block = BLOCK_SIZE,
) -> Iterator[tuple[str, str, torch.Tensor]]:
    """The stream with each float8 weight replaced by fp8 * its `<name>_scale_inv` (in `dtype`) and
    the scale tensors dropped. A scale may come before or after its weight, in any shard."""
    for file, name, tensor in tensors:
        if name.endswith(SCALE_SUFFIX):
            weight = name[: -len(SCALE_SUFFIX)]
            if not shards.has(weight):
                raise ModelLoadError(f"{file}: tensor {name}: FP8 scale without its weight {weight}")
            continue  # consumed with its weight
        scale_name = name + SCALE_SUFFIX
        if tensor.dtype == FP8_DTYPE:
            if not shards.has(scale_name):
                raise ModelLoadError(f"{file}: tensor {name}: float8 weight without its scale {scale_name}")
            try:
                tensor = dequantize_block_fp8(tensor, shards.read(scale_name), block_size, dtype)
            except ValueError as e:
                raise ModelLoadError(f"{file}: tensor {name}: {e}") from e
        elif tensor.dtype.is_floating_point and tensor.element_size() == 1:
            raise ModelLoadError(f"{file}: tensor {name}: {tensor.dtype} is not supported (only float8_e4m3fn)")
        elif shards.has(scale_name):
            raise ModelLoadError(f"{file}: tensor {name}: has a scale {scale_name} but is {tensor.dtype}, not float8")
        yield file, name, tensor


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


class Shards:
    """A checkpoint's safetensors files, each opened on first use (only its header is read then;
    a tensor is read when asked for), so a tensor can be fetched from any shard by name."""

    def __init__(self, directory: Path, files: list[Path]):
        self.directory = directory
        self.files = files
        self._open: dict[Path, Any] = {}
        self._where: dict[str, Path] | None = None

    def tensors(self, skip: Callable[[str], bool] | None = None) -> Iterator[tuple[str, str, torch.Tensor]]:
        """Every tensor (but those `skip` names, never read), file by file, in each file's own order."""
        for file in self.files:
            handle = self._handle(file)
            for name in self._keys(file, handle):
                if skip is None or not skip(name):
                    yield str(file), name, _get_tensor(handle, file, name)

    def has(self, name: str) -> bool:
        return name in self._index()

    def read(self, name: str) -> torch.Tensor:
        file = self._index()[name]
        return _get_tensor(self._handle(file), file, name)

    def close(self) -> None:
        for handle in self._open.values():
            handle.__exit__(None, None, None)
        self._open.clear()

    def _index(self) -> dict[str, Path]:
        """Tensor name -> file: the index's weight_map, or every file's header."""
        if self._where is None:
            index = self.directory / INDEX_FILE
            if index.is_file():
                weight_map = json.loads(index.read_text())["weight_map"]  # validated by safetensors_files
                self._where = {name: self.directory / file for name, file in weight_map.items()}
            else:
                self._where = {n: f for f in self.files for n in self._keys(f, self._handle(f))}
        return self._where

    def _handle(self, file: Path):
        if file not in self._open:
            try:
                self._open[file] = safe_open(file, framework="pt")
            except SafetensorError as e:
                raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from e
        return self._open[file]

    @staticmethod
    def _keys(file: Path, handle) -> list[str]:
        try:
            return list(handle.keys())
        except SafetensorError as e:
            raise ModelLoadError(f"{file}: corrupt or truncated safetensors file ({e})") from e


def _get_tensor(f, file: Path, name: str) -> torch.Tensor:
    try:
        return f.get_tensor(name)
    except (SafetensorError, RuntimeError) as e:
        raise ModelLoadError(f"{file}: tensor {name}: unreadable ({e})") from e
