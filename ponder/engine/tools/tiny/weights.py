"""The tiny models' tensors: seeded random weights under Hugging Face names, FP8 block quantisation
as the official DeepSeek checkpoints store it, and safetensors shards with their index. Same
arguments, same bytes. Torch is imported inside the functions (the specs need none).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ponder.engine.checkpoint import INDEX_FILE, SCALE_SUFFIX
from ponder.engine.tools.tiny.specs import VOCAB_SIZE

# Linear weights the official checkpoints store in FP8; embeddings, norms, the router, eh_proj and
# the heads stay in bf16.
FP8_WEIGHT = re.compile(
    r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
ROUTER_GAIN = 2.0  # router logits ~N(0, 4): sigmoid scores far enough apart that routing is decisive


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


def deepseek_weights(
    config: dict[str, Any], seed: int, dtype: str = "float32", branch_gain: float = 1.0, bigram_mtp: bool = False
) -> dict[str, Any]:
    """HF-named tensors for a DeepSeek-V3 config (official layout, per-expert names), plus the MTP
    layer(s) `model.layers.{num_hidden_layers + i}` when `num_nextn_predict_layers` says so.

    A random MTP layer's drafts are almost never accepted. For speculative decoding to have
    something to accept, `branch_gain` < 1 shrinks every attention and MLP output (o_proj,
    down_proj), so the residual stream stays close to the token's embedding and the model leans
    towards a bigram model; `bigram_mtp` then makes the MTP layer that bigram model (eh_proj picks
    the next token's normalised embedding, the shared head's norm is the model's), so its drafts
    agree with the model where the context matters little and disagree where it matters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    heads, q_lora, kv_lora = config["num_attention_heads"], config["q_lora_rank"], config["kv_lora_rank"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    experts, moe_inter = config["n_routed_experts"], config["moe_intermediate_size"]

    def linear(out_features: int, in_features: int, gain: float = 1.0) -> torch.Tensor:
        return torch.randn(out_features, in_features, generator=gen) * (gain / in_features**0.5)

    def norm(size: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(size, generator=gen)

    def mlp(prefix: str, inter: int) -> None:
        weights[prefix + "gate_proj.weight"] = linear(inter, hidden)
        weights[prefix + "up_proj.weight"] = linear(inter, hidden)
        weights[prefix + "down_proj.weight"] = linear(hidden, inter)

    def decoder_layer(p: str, dense: bool) -> None:
        weights[p + "input_layernorm.weight"] = norm(hidden)
        a = p + "self_attn."
        if q_lora is None:
            weights[a + "q_proj.weight"] = linear(heads * (nope + rope), hidden)
        else:
            weights[a + "q_a_proj.weight"] = linear(q_lora, hidden)
            weights[a + "q_a_layernorm.weight"] = norm(q_lora)
            weights[a + "q_b_proj.weight"] = linear(heads * (nope + rope), q_lora)
        weights[a + "kv_a_proj_with_mqa.weight"] = linear(kv_lora + rope, hidden)
        weights[a + "kv_a_layernorm.weight"] = norm(kv_lora)
        weights[a + "kv_b_proj.weight"] = linear(heads * (nope + v_dim), kv_lora)
        weights[a + "o_proj.weight"] = linear(hidden, heads * v_dim)
        weights[p + "post_attention_layernorm.weight"] = norm(hidden)
        if dense:
            mlp(p + "mlp.", config["intermediate_size"])
            return
        weights[p + "mlp.gate.weight"] = linear(experts, hidden, gain=ROUTER_GAIN)
        weights[p + "mlp.gate.e_score_correction_bias"] = 0.05 * torch.randn(experts, generator=gen)
        for e in range(experts):
            mlp(p + f"mlp.experts.{e}.", moe_inter)
        mlp(p + "mlp.shared_experts.", moe_inter * config["n_shared_experts"])

    weights = {"model.embed_tokens.weight": torch.randn(vocab, hidden, generator=gen)}
    layers = config["num_hidden_layers"]
    for i in range(layers):
        decoder_layer(f"model.layers.{i}.", dense=i < config["first_k_dense_replace"])
    weights["model.norm.weight"] = norm(hidden)
    weights["lm_head.weight"] = linear(vocab, hidden, gain=3.0)
    for i in range(config.get("num_nextn_predict_layers", 0)):
        # MTP module: its own embedding and head (copies of the model's, as in the official checkpoint)
        p = f"model.layers.{layers + i}."
        weights[p + "embed_tokens.weight"] = weights["model.embed_tokens.weight"].clone()
        weights[p + "enorm.weight"] = norm(hidden)
        weights[p + "hnorm.weight"] = norm(hidden)
        weights[p + "eh_proj.weight"] = linear(hidden, 2 * hidden)
        decoder_layer(p, dense=False)
        weights[p + "shared_head.norm.weight"] = norm(hidden)
        weights[p + "shared_head.head.weight"] = weights["lm_head.weight"].clone()
        if bigram_mtp:
            weights[p + "enorm.weight"] = torch.ones(hidden)
            weights[p + "eh_proj.weight"] = torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1)
            weights[p + "shared_head.norm.weight"] = weights["model.norm.weight"].clone()
    for name in weights:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            weights[name] = weights[name] * branch_gain
    storage = getattr(torch, dtype)
    return {
        name: (t if name.endswith("e_score_correction_bias") else t.to(storage)).contiguous()
        for name, t in weights.items()
    }


def quantize_fp8_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """Every linear weight the official checkpoints quantise, as float8_e4m3fn + `weight_scale_inv`."""
    from ponder.engine.runtime.fp8 import quantize_block_fp8

    out = {}
    for name, tensor in weights.items():
        if FP8_WEIGHT.search(name):
            out[name], out[name + SCALE_SUFFIX] = quantize_block_fp8(tensor.float())
        else:
            out[name] = tensor
    return out


def scales_apart(names: list[str], shards: int) -> dict[str, int]:
    """Shard by name order, except that every third scale goes to the next shard (wrapping round,
    so some scales come before their weight in the file order and some after)."""
    weights = [n for n in names if not n.endswith(SCALE_SUFFIX)]
    per_shard = -(-len(weights) // shards)
    placement = {n: i // per_shard for i, n in enumerate(weights)}
    scales = [n for n in names if n.endswith(SCALE_SUFFIX)]
    for i, scale in enumerate(scales):
        shard = placement[scale.removesuffix(SCALE_SUFFIX)]
        placement[scale] = (shard + 1) % shards if i % 3 == 0 else shard
    return placement


def write_weights(
    directory: Path, weights: dict[str, Any], shards: int, placement: dict[str, int] | None = None
) -> None:
    """One file, or `shards` files in name order (or as `placement` says) with an index."""
    from safetensors.torch import save_file

    names = list(weights)
    if shards == 1:
        save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
        return
    per_shard = -(-len(names) // shards)
    placement = placement or {n: i // per_shard for i, n in enumerate(names)}
    weight_map = {}
    for index in range(shards):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: weights[n] for n in names if placement[n] == index}
        save_file(part, directory / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, filename))
    total = sum(t.numel() * t.element_size() for t in weights.values())
    index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index_json, indent=2))
