"""GGUF files: config, tokenizer metadata and dequantised tensors under Hugging Face names.

No torch here: the API process reads the tokenizer from the same file. Tensors come out as
float32 numpy arrays (dequantised by the `gguf` package) and the loader turns them into weights.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ModelLoadError

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


@lru_cache(maxsize=4)
def open_gguf(path: Path):
    """A parsed reader (cached: parsing a 49K-token vocabulary takes a moment)."""
    import gguf

    if not path.is_file():
        raise ModelLoadError(f"{path}: GGUF file not found")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises bare ValueError/struct errors on damage
        raise ModelLoadError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from e


def metadata(path: Path) -> dict[str, Any]:
    """All metadata fields as Python values."""
    reader = open_gguf(Path(path))
    return {name: _field_value(f) for name, f in reader.fields.items() if not name.startswith("GGUF.")}


def _field_value(f) -> Any:
    try:
        return f.contents()
    except Exception:  # a field type the gguf package cannot render is not one we use
        return None


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
    import gguf

    reader = open_gguf(Path(path))
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        if name is None:
            continue
        try:
            array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{path}: tensor {tensor.name}: cannot dequantise ({e})") from e
        yield name, _unpermute_rope_rows(name, np.asarray(array, dtype=np.float32), config)


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
