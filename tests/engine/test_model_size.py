"""Parameter, weight and KV-cache figures from config.json, checked against transformers' own
models built on the meta device (nothing is allocated, so even R1 builds in seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from engine.config import ModelConfig
from engine.errors import ModelLoadError
from engine.model_size import main_tensors, mha_kv_cache_bytes_per_token, model_size, mtp_tensors

R1_CONFIG = Path(__file__).resolve().parents[1] / "data" / "deepseek-r1-config.json"

TINY_DEEPSEEK = {
    "model_type": "deepseek_v3",
    "vocab_size": 300,
    "hidden_size": 200,
    "intermediate_size": 320,
    "moe_intermediate_size": 72,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 96,
    "kv_lora_rank": 48,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 24,
    "n_routed_experts": 12,
    "num_experts_per_tok": 3,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "num_nextn_predict_layers": 1,
    "tie_word_embeddings": False,
    "rope_theta": 10000.0,
}

DEEPSEEK_VARIANTS = {
    "q_lora": {},
    "no_q_lora": {"q_lora_rank": None},
    "all_moe": {"first_k_dense_replace": 0},
    "two_dense_two_shared": {"first_k_dense_replace": 2, "n_shared_experts": 2},
    "no_shared": {"n_shared_experts": 0},
    "tied": {"tie_word_embeddings": True},
    "attention_bias": {"attention_bias": True},
}


def _meta_model(data: dict):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model_type = data["model_type"]
    config_cls, model_cls = {
        "deepseek_v3": (transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[model_type]
    fields = {k: v for k, v in data.items() if k not in ("model_type", "quantization_config")}
    with torch.device("meta"):
        return model_cls(config_cls(**fields))


def _meta_count(model) -> int:
    """transformers' parameters (tied ones once) + the router bias, a checkpoint buffer there."""
    params = sum(p.numel() for p in model.parameters())
    return params + sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # no shared experts
@pytest.mark.parametrize("variant", DEEPSEEK_VARIANTS)
def test_deepseek_count_matches_transformers(variant):
    data = {**TINY_DEEPSEEK, **DEEPSEEK_VARIANTS[variant]}
    size = model_size(ModelConfig.from_dict(data))
    model = _meta_model(data)
    assert size.parameters == _meta_count(model)
    assert size.mtp_parameters > 0 and size.total_parameters == size.parameters + size.mtp_parameters


def test_deepseek_tensor_names_and_shapes_match_transformers():
    data = {**TINY_DEEPSEEK, "tie_word_embeddings": False}
    model = _meta_model(data)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if ".mlp.experts." not in n}
    ours = {t.name: t.shape for t in main_tensors(ModelConfig.from_dict(data)) if ".mlp.experts." not in t.name}
    assert ours == expected
    # transformers fuses the experts in memory; the checkpoint (and we) name each one.
    fused = sum(t.numel() for n, t in model.state_dict().items() if ".mlp.experts." in n)
    per_expert = sum(t.numel for t in main_tensors(ModelConfig.from_dict(data)) if ".mlp.experts." in t.name)
    assert per_expert == fused


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_dense_count_matches_transformers(model_type, tied):
    data = {
        "model_type": model_type,
        "vocab_size": 320,
        "hidden_size": 64,
        "intermediate_size": 160,
        "num_hidden_layers": 3,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "tie_word_embeddings": tied,
    }
    size = model_size(ModelConfig.from_dict(data))
    assert size.parameters == _meta_count(_meta_model(data))
    assert size.mtp_parameters == 0 and size.activated_parameters == size.parameters
    assert size.weight_bytes_fp8 is None


def test_activated_parameters_count_top_k_of_the_routed_experts():
    data = {**TINY_DEEPSEEK, "first_k_dense_replace": 1}
    size = model_size(ModelConfig.from_dict(data))
    expert = 3 * data["hidden_size"] * data["moe_intermediate_size"]
    moe_layers = data["num_hidden_layers"] - 1
    unused = moe_layers * (data["n_routed_experts"] - data["num_experts_per_tok"]) * expert
    assert size.activated_parameters == size.parameters - unused


def test_r1_figures():
    config = ModelConfig.from_pretrained(R1_CONFIG)
    size = model_size(config)
    # Exact, from the config; equal to transformers' count below (671B main, 37B active per token).
    assert size.parameters == 671_026_419_200
    assert size.mtp_parameters == 13_463_426_304  # model.layers.61: embed + head copies, a MoE layer
    assert round(size.total_parameters / 1e9) == 684  # the HF card's "685B" = 671B + "14B" MTP
    assert size.activated_parameters == 37_552_297_472
    assert config.kv_cache_bytes_per_token(2) == 70_272
    assert config.kv_cache_bytes_per_token(2) * 131_072 == 9_210_691_584
    mha = mha_kv_cache_bytes_per_token(config, 2)
    assert mha == 61 * 128 * (128 + 64 + 128) * 2
    assert round(mha / config.kv_cache_bytes_per_token(2)) == 71  # docs/architecture.md#r1-figures: "71x"


def test_r1_count_matches_transformers_on_meta():
    data = json.loads(R1_CONFIG.read_text())
    assert model_size(ModelConfig.from_dict(data)).parameters == _meta_count(_meta_model(data))


def _fp8_bytes_from_transformers(model, block: tuple[int, int]) -> int:
    """FP8 checkpoint bytes worked out from transformers' tensors: every projection weight is one
    byte plus a fp32 scale per block; embeddings, norms, head and router bf16; router bias fp32."""

    def fp8(out: int, inp: int) -> int:
        return out * inp + 4 * math.ceil(out / block[0]) * math.ceil(inp / block[1])

    total = 0
    for name, p in model.named_parameters():
        if name.endswith("experts.gate_up_proj"):  # [E, 2I, H]: gate and up, each [I, H]
            e, two_i, h = p.shape
            total += e * 2 * fp8(two_i // 2, h)
        elif name.endswith("experts.down_proj"):  # [E, H, I]
            e, h, i = p.shape
            total += e * fp8(h, i)
        elif name.endswith("_proj.weight") or name.endswith("_mqa.weight"):
            total += fp8(*p.shape)
        else:
            total += 2 * p.numel()
    return total + sum(4 * b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))


@pytest.mark.parametrize("block", [(128, 128), (64, 32)])
def test_fp8_weight_bytes(block):
    data = {**TINY_DEEPSEEK, "quantization_config": {"quant_method": "fp8", "weight_block_size": list(block)}}
    size = model_size(ModelConfig.from_dict(data))
    assert size.weight_bytes_fp8 == _fp8_bytes_from_transformers(_meta_model(data), block)
    assert size.weight_bytes_fp8 < size.weight_bytes


def test_r1_weight_bytes():
    size = model_size(ModelConfig.from_pretrained(R1_CONFIG))
    # bf16: 2 bytes per parameter, the 58 routers' bias in fp32.
    assert size.weight_bytes == 2 * size.parameters + 2 * 58 * 256
    # FP8: about a byte per parameter (the bf16 embeddings, head and norms add ~0.3%).
    assert 1.0 < size.weight_bytes_fp8 / size.parameters < 1.01
    # The whole FP8 checkpoint (with MTP) is ~641 GiB, as the published safetensors shards are.
    assert round((size.weight_bytes_fp8 + size.mtp_weight_bytes_fp8) / 2**30) == 641
    names = {t.name for t in mtp_tensors(ModelConfig.from_pretrained(R1_CONFIG))}
    assert "model.layers.61.eh_proj.weight" in names and "model.layers.61.mlp.experts.255.down_proj.weight" in names


def test_incomplete_deepseek_config_is_a_clear_error():
    data = {k: v for k, v in TINY_DEEPSEEK.items() if k != "n_routed_experts"}
    with pytest.raises(ModelLoadError, match="n_routed_experts"):
        model_size(ModelConfig.from_dict(data))
