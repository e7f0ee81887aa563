"""Deterministic tiny random checkpoints, written as real Hugging Face directories.

Same name, same bytes: weights come from a seeded generator. The tokenizer is byte-level BPE with
no merges (every UTF-8 byte is a token, so multi-byte characters always span tokens) plus chat
and reasoning special tokens. Weights are scaled so logits are well spread: greedy choices then
do not hinge on rounding, which keeps comparisons against transformers meaningful.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>"]
THINK_TOKENS = ["<think>", "</think>"]  # added tokens, not special: they show in decoded text
VOCAB_SIZE = 320  # 256 bytes + 6 named tokens + reserved padding

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Opens the thinking block in the prompt, as DeepSeek-R1's template does.
CHATML_THINKING = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('system messages are not supported') }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n<think>\\n' }}{% endif %}"
)

SPECS: dict[str, dict[str, Any]] = {
    "tiny-llama": {
        "config": {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "head_dim": 16,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 4.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 512,
            },
            "tie_word_embeddings": False,
            "attention_bias": False,
            "mlp_bias": False,
            "hidden_act": "silu",
        },
        "bos": "<|begin_of_text|>",
        "eos": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": CHATML_THINKING,
        "seed": 1234,
        "shards": 2,
    },
    "tiny-qwen2": {
        "config": {
            "architectures": ["Qwen2ForCausalLM"],
            "model_type": "qwen2",
            "hidden_size": 96,
            "intermediate_size": 192,
            "num_hidden_layers": 2,
            "num_attention_heads": 6,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0,
            "tie_word_embeddings": False,  # as in the R1 Qwen distills (7B and up); SmolLM2 covers tied
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": 2,
            "hidden_act": "silu",
        },
        "bos": None,
        "eos": "<|im_end|>",
        "add_bos_token": False,
        "chat_template": CHATML,
        "seed": 5678,
        "shards": 1,
    },
}


MARKER = "ponder-tiny.json"


def fingerprint(name: str) -> str:
    """Changes whenever the spec (or this format) changes, so stale cached copies are remade."""
    import hashlib

    spec = json.dumps({"spec": SPECS[name], "vocab": VOCAB_SIZE, "format": 1}, sort_keys=True)
    return hashlib.sha256(spec.encode()).hexdigest()[:16]


def is_current(name: str, directory: Path) -> bool:
    marker = directory / MARKER
    return marker.is_file() and json.loads(marker.read_text()).get("fingerprint") == fingerprint(name)


def make_tiny(name: str, directory: Path) -> Path:
    """Write the tiny model `name` into `directory` (atomically: all files or none)."""
    if name not in SPECS:
        raise ModelLoadError(f"unknown tiny model {name!r}; known: {', '.join(SPECS)}")
    spec = SPECS[name]
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{name}-"))
    try:
        config = _config(spec)
        _write_tokenizer(staging, spec)
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        (staging / "generation_config.json").write_text(
            json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
        )
        _write_weights(staging, random_weights(config, spec["seed"]), spec["shards"])
        (staging / MARKER).write_text(json.dumps({"name": name, "fingerprint": fingerprint(name)}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    vocab = _vocab()
    return {
        **spec["config"],
        "vocab_size": VOCAB_SIZE,
        "bos_token_id": vocab[spec["bos"]] if spec["bos"] else None,
        "eos_token_id": vocab[spec["eos"]],
        "torch_dtype": "float32",
    }


def random_weights(config: dict[str, Any], seed: int) -> dict[str, Any]:
    """HF-named tensors for a Llama-family config, drawn from a seeded generator."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    bias = config["model_type"] == "qwen2" or config.get("attention_bias", False)

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * (gain / in_features**0.5)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    weights = {"model.embed_tokens.weight": torch.randn(VOCAB_SIZE, hidden, generator=gen)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "input_layernorm.weight"] = norm(hidden)
        for proj, rows in (
            ("q_proj", heads * head_dim),
            ("k_proj", kv_heads * head_dim),
            ("v_proj", kv_heads * head_dim),
        ):
            weights[p + f"self_attn.{proj}.weight"] = linear(rows, hidden)
            if bias:
                weights[p + f"self_attn.{proj}.bias"] = 0.5 * torch.randn(rows, generator=gen)
        weights[p + "self_attn.o_proj.weight"] = linear(hidden, heads * head_dim)
        weights[p + "post_attention_layernorm.weight"] = norm(hidden)
        weights[p + "mlp.gate_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = linear(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = linear(hidden, inter)
    weights["model.norm.weight"] = norm(hidden)
    if not config.get("tie_word_embeddings", False):
        weights["lm_head.weight"] = linear(VOCAB_SIZE, hidden, gain=3.0)
    return {name: t.contiguous() for name, t in weights.items()}


def _write_weights(directory: Path, weights: dict[str, Any], shards: int) -> None:
    from safetensors.torch import save_file

    names = list(weights)
    if shards == 1:
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        return
    per_shard = -(-len(names) // shards)
    weight_map = {}
    for index in range(shards):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names[index * per_shard : (index + 1) * per_shard]}
        save_file(part, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _vocab() -> dict[str, int]:
    from engine.tokenizer import _bytes_to_unicode

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
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


def _write_tokenizer(directory: Path, spec: dict[str, Any]) -> None:
    vocab = _vocab()
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
    tokenizer = {
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
