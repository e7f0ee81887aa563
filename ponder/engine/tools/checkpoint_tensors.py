"""The tensors a checkpoint stores, from its config alone (no weights, no torch): HF names, shapes
and how each is stored (docs/architecture.md#checkpoint-layout), so the MTP module, the FP8 block
scales and the router's fp32 bias are counted the way they are stored. The sizing calculator
(model_size.py, parallel_size.py) adds them up.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

from ponder.engine.config import ModelConfig

# How a tensor is stored: "linear" weights become float8 in an FP8 checkpoint (with a fp32
# block scale); "dense" tensors (embeddings, norms, lm_head, router, biases) stay at the model
# dtype; "fp32" tensors (the router's e_score_correction_bias) are fp32 in every checkpoint.
LINEAR, DENSE, FP32 = "linear", "dense", "fp32"


@dataclass(frozen=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    kind: str

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def main_tensors(config: ModelConfig) -> Iterator[Tensor]:
    hidden, vocab = config.hidden_size, config.vocab_size
    yield Tensor("model.embed_tokens.weight", (vocab, hidden), DENSE)
    for i in range(config.num_hidden_layers):
        yield from _decoder_layer(config, i, f"model.layers.{i}.")
    yield Tensor("model.norm.weight", (hidden,), DENSE)
    if not config.tie_word_embeddings:
        yield Tensor("lm_head.weight", (vocab, hidden), DENSE)


def mtp_tensors(config: ModelConfig) -> Iterator[Tensor]:
    """DeepSeek-V3's MTP module(s): own embedding and head copies, two norms, the projection of
    [norm(h) | norm(emb)] back to hidden, and a full decoder layer."""
    if config.model_type != "deepseek_v3":
        return
    hidden, vocab = config.hidden_size, config.vocab_size
    for j in range(int(config.extra.get("num_nextn_predict_layers") or 0)):
        i = config.num_hidden_layers + j
        p = f"model.layers.{i}."
        yield Tensor(p + "embed_tokens.weight", (vocab, hidden), DENSE)
        yield Tensor(p + "enorm.weight", (hidden,), DENSE)
        yield Tensor(p + "hnorm.weight", (hidden,), DENSE)
        yield Tensor(p + "eh_proj.weight", (hidden, 2 * hidden), DENSE)  # bf16 in the FP8 checkpoints
        yield Tensor(p + "shared_head.norm.weight", (hidden,), DENSE)
        yield Tensor(p + "shared_head.head.weight", (vocab, hidden), DENSE)
        yield from _decoder_layer(config, i, p)


def loaded_mtp_tensors(config: ModelConfig) -> list[Tensor]:
    """The MTP layer as the engine loads it for speculative decoding: the first one, without its
    copies of the embedding and LM head (ponder/engine/runtime/models/deepseek_v3.py MTP_SHARED)."""
    first = f"model.layers.{config.num_hidden_layers}."
    shared = (first + "embed_tokens.weight", first + "shared_head.head.weight")
    return [t for t in mtp_tensors(config) if t.name.startswith(first) and t.name not in shared]


def _decoder_layer(config: ModelConfig, i: int, p: str) -> Iterator[Tensor]:
    hidden = config.hidden_size
    yield Tensor(p + "input_layernorm.weight", (hidden,), DENSE)
    if config.attention_kind == "mla":
        yield from _mla(config, p + "self_attn.")
    else:
        yield from _mha(config, p + "self_attn.")
    yield Tensor(p + "post_attention_layernorm.weight", (hidden,), DENSE)
    if is_moe_layer(config, i):
        yield from _moe(config, p + "mlp.")
    else:
        yield from _mlp(p + "mlp.", hidden, config.intermediate_size)


def _mha(config: ModelConfig, p: str) -> Iterator[Tensor]:
    hidden = config.hidden_size
    q_size = config.num_attention_heads * config.head_dim
    kv_size = config.num_key_value_heads * config.head_dim
    for name, out in (("q_proj", q_size), ("k_proj", kv_size), ("v_proj", kv_size)):
        yield Tensor(f"{p}{name}.weight", (out, hidden), LINEAR)
        if config.attention_bias:
            yield Tensor(f"{p}{name}.bias", (out,), DENSE)
    yield Tensor(p + "o_proj.weight", (hidden, q_size), LINEAR)


def _mla(config: ModelConfig, p: str) -> Iterator[Tensor]:
    x, hidden, heads = config.extra, config.hidden_size, config.num_attention_heads
    q_lora, kv_lora, rope = x.get("q_lora_rank"), x["kv_lora_rank"], x["qk_rope_head_dim"]
    qk_head = x["qk_nope_head_dim"] + rope
    bias = config.attention_bias  # transformers puts it on q_a_proj, kv_a_proj_with_mqa and o_proj
    if q_lora:
        yield from _linear(p + "q_a_proj", q_lora, hidden, bias)
        yield Tensor(p + "q_a_layernorm.weight", (q_lora,), DENSE)
        yield from _linear(p + "q_b_proj", heads * qk_head, q_lora)
    else:
        yield from _linear(p + "q_proj", heads * qk_head, hidden)
    yield from _linear(p + "kv_a_proj_with_mqa", kv_lora + rope, hidden, bias)
    yield Tensor(p + "kv_a_layernorm.weight", (kv_lora,), DENSE)
    yield from _linear(p + "kv_b_proj", heads * (x["qk_nope_head_dim"] + x["v_head_dim"]), kv_lora)
    yield from _linear(p + "o_proj", hidden, heads * x["v_head_dim"], bias)


def _moe(config: ModelConfig, p: str) -> Iterator[Tensor]:
    x, hidden = config.extra, config.hidden_size
    experts, inter = int(x["n_routed_experts"]), int(x["moe_intermediate_size"])
    yield Tensor(p + "gate.weight", (experts, hidden), DENSE)
    yield Tensor(p + "gate.e_score_correction_bias", (experts,), FP32)
    for e in range(experts):
        yield from _mlp(f"{p}experts.{e}.", hidden, inter)
    shared = int(x["n_shared_experts"] or 0)
    if shared:
        yield from _mlp(p + "shared_experts.", hidden, inter * shared)


def _mlp(p: str, hidden: int, inter: int) -> Iterator[Tensor]:
    yield Tensor(p + "gate_proj.weight", (inter, hidden), LINEAR)
    yield Tensor(p + "up_proj.weight", (inter, hidden), LINEAR)
    yield Tensor(p + "down_proj.weight", (hidden, inter), LINEAR)


def _linear(name: str, out: int, inp: int, bias: bool = False) -> Iterator[Tensor]:
    yield Tensor(name + ".weight", (out, inp), LINEAR)
    if bias:
        yield Tensor(name + ".bias", (out,), DENSE)


def is_moe_layer(config: ModelConfig, i: int) -> bool:
    if config.model_type != "deepseek_v3":
        return False
    x = config.extra
    return i >= int(x["first_k_dense_replace"]) and i % int(x.get("moe_layer_freq") or 1) == 0


def numel(tensors: list[Tensor]) -> int:
    """Their parameters."""
    return sum(t.numel for t in tensors)


def stored_bytes(tensors: list[Tensor], dtype_bytes: int, fp8_block: tuple[int, int] | None = None) -> int:
    """Their bytes: `dtype_bytes` per element, the fp32 tensors at 4, and with an `fp8_block` the
    linear weights as float8 plus one fp32 scale per block."""
    total = 0
    for t in tensors:
        if t.kind == FP32:
            total += 4 * t.numel
        elif t.kind == LINEAR and fp8_block:
            out, inp = t.shape
            scales = math.ceil(out / fp8_block[0]) * math.ceil(inp / fp8_block[1])
            total += t.numel + 4 * scales  # float8 weight + fp32 weight_scale_inv per block
        else:
            total += dtype_bytes * t.numel
    return total
