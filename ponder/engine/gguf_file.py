"""GGUF files: config, tokenizer metadata and dequantised tensors under Hugging Face names.

No torch here: the API process reads the tokenizer from the same file. Tensors come out as
float32 numpy arrays (dequantised by the `gguf` package) and the loader turns them into weights.
"""

from __future__ import annotations

import mmap
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from ponder.engine.errors import ModelLoadError

# llama.cpp architecture name -> HF model_type.
GGUF_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}

_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (rows first), i.e. GGUF's dims reversed
    qtype: int
    offset: int  # from the start of the data section


@dataclass
class GGUFFile:
    path: Path
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    data_offset: int


class _Cursor:
    """Reads GGUF's little-endian header fields from a memory map."""

    def __init__(self, buffer: memoryview) -> None:
        self.buffer, self.pos = buffer, 0

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        size = self.scalar("<Q")
        raw = bytes(self.buffer[self.pos : self.pos + size])
        self.pos += size
        return raw.decode("utf-8", errors="replace")

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            item_kind, count = self.scalar("<I"), self.scalar("<Q")
            if item_kind in _SCALARS and item_kind != 7:  # numeric arrays in one read
                dtype = np.dtype(_SCALARS[item_kind])
                values = np.frombuffer(self.buffer, dtype=dtype, count=count, offset=self.pos)
                self.pos += dtype.itemsize * count
                return values.tolist()
            return [self.value(item_kind) for _ in range(count)]
        if kind not in _SCALARS:
            raise ValueError(f"unknown metadata value type {kind}")
        return self.scalar(_SCALARS[kind])


@lru_cache(maxsize=4)
def open_gguf(path: Path) -> GGUFFile:
    """Header, metadata and tensor index of a GGUF file (cached; tensor data stays on disk)."""
    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file not found")
    try:
        return _parse(path)
    except (ValueError, struct.error, UnicodeDecodeError, OverflowError) as e:
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def _parse(path: Path) -> GGUFFile:
    with open(path, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    cursor = _Cursor(memoryview(mapped))
    if bytes(cursor.buffer[:4]) != b"GGUF":
        raise ValueError("bad magic (expected GGUF)")
    cursor.pos = 4
    version = cursor.scalar("<I")
    if version < 2:
        raise ValueError(f"GGUF version {version} is too old")
    tensor_count, kv_count = cursor.scalar("<Q"), cursor.scalar("<Q")
    meta = {}
    for _ in range(kv_count):
        key = cursor.string()
        meta[key] = cursor.value(cursor.scalar("<I"))
    tensors = []
    for _ in range(tensor_count):
        name = cursor.string()
        dims = [cursor.scalar("<Q") for _ in range(cursor.scalar("<I"))]
        qtype, offset = cursor.scalar("<I"), cursor.scalar("<Q")
        tensors.append(GGUFTensor(name, tuple(reversed(dims)), qtype, offset))
    alignment = int(meta.get("general.alignment", 32))
    data_offset = -(-cursor.pos // alignment) * alignment
    return GGUFFile(path, meta, tensors, data_offset)


def metadata(path: Path) -> dict[str, Any]:
    """All metadata fields as Python values."""
    return open_gguf(Path(path)).metadata


def read_gguf_config(path: Path) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata."""
    meta = metadata(path)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )

    def key(name: str, default: Any = None) -> Any:
        return meta.get(f"{arch}.{name}", default)

    heads = key("attention.head_count")
    hidden = key("embedding_length")
    tensor_names = {t.name for t in open_gguf(Path(path)).tensors}
    config = {
        "model_type": GGUF_ARCHITECTURES[arch],
        "vocab_size": key("vocab_size") or len(meta.get("tokenizer.ggml.tokens") or []),
        "hidden_size": hidden,
        "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": key("attention.head_count_kv", heads),
        "head_dim": key("attention.key_length") or key("rope.dimension_count") or hidden // heads,
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": key("rope.freq_base", 10000.0),
        "max_position_embeddings": key("context_length", 4096),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if key("rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": key("rope.scaling.factor")}
    return config


def iter_gguf_tensors(path: Path, config: dict[str, Any]) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, float32 array) for every tensor, dequantised and in HF's row layout."""
    gguf_file = open_gguf(Path(path))
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for tensor in gguf_file.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        array = _dequantize(gguf_file, data, tensor)
        yield name, _unpermute_rope_rows(name, array, config)


def _dequantize(gguf_file: GGUFFile, data: np.ndarray, tensor: GGUFTensor) -> np.ndarray:
    import gguf

    try:
        qtype = gguf.GGMLQuantizationType(tensor.qtype)
        block_elems, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
        rows, row_elems = int(np.prod(tensor.shape[:-1])), tensor.shape[-1]
        row_bytes = row_elems // block_elems * block_bytes
        start = gguf_file.data_offset + tensor.offset
        if start + rows * row_bytes > data.shape[0]:
            raise ValueError("tensor data runs past the end of the file (truncated?)")
        raw = data[start : start + rows * row_bytes].reshape(rows, row_bytes)
        array = gguf.quants.dequantize(raw, qtype)
    except Exception as e:  # unknown types, short files: name the tensor
        raise ModelLoadError(f"{gguf_file.path}: tensor {tensor.name}: cannot dequantise ({e})") from e
    return np.array(array, dtype=np.float32).reshape(tensor.shape)  # a writable copy, never the map


def hf_tensor_name(gguf_name: str) -> str | None:
    """HF checkpoint name of a GGUF tensor; None for tensors the model does not load."""
    if match := _LAYER_NAME.match(gguf_name):
        layer, part, kind = match.groups()
        if part not in _LAYER_TENSORS:
            return None
        return f"model.layers.{layer}.{_LAYER_TENSORS[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    return None  # e.g. rope_freqs: derived from the config instead


def _unpermute_rope_rows(name: str, array: np.ndarray, config: dict[str, Any]) -> np.ndarray:
    """llama.cpp stores Llama's q/k rows interleaved for its rope; HF's rotate-half wants halves."""
    if config["model_type"] != "llama":
        return array
    if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
        heads = config["num_attention_heads"]
    elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
        heads = config["num_key_value_heads"]
    else:
        return array
    rows = array.shape[0]
    # [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...]: pairs back to halves
    return array.reshape(heads, rows // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
