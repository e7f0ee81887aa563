"""Parameter, weight and KV-cache figures from config.json, checked against transformers' own
models built on the meta device (nothing is allocated, so even R1 builds in seconds)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from ponder.engine.config import ModelConfig
from ponder.engine.errors import ConfigError, ModelLoadError
from ponder.engine.tools.checkpoint_tensors import main_tensors, mtp_tensors
from ponder.engine.tools.model_size import mha_kv_cache_bytes_per_token, model_size
from ponder.engine.tools.parallel_size import (
    check_parallel,
    kv_cache_bytes_per_token_per_gpu,
    memory_plan,
    parallel_size,
    parse_memory_size,
    placement,
    rank_bytes,
)

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


# -- per GPU under tensor / expert parallelism ---------------------------------------------------


def _r1_fp8_bytes_per_gpu(data: dict, tp: int, ep: bool) -> tuple[int, int]:
    """R1 FP8 on tp GPUs by hand from config.json's fields: (bytes per GPU, replicated part).
    FP8 linear = a byte per weight + a fp32 scale per 128x128 block of its shard; the rest bf16."""
    block = data["quantization_config"]["weight_block_size"]

    def fp8(out: int, inp: int) -> int:
        return out * inp + 4 * math.ceil(out / block[0]) * math.ceil(inp / block[1])

    def mlp(inter: int) -> int:  # gate + up split by rows, down by columns
        return 2 * fp8(inter, h) + fp8(h, inter)

    h, v, heads, layers = (
        data["hidden_size"],
        data["vocab_size"],
        data["num_attention_heads"],
        data["num_hidden_layers"],
    )
    q_lora, kv_lora, rope = data["q_lora_rank"], data["kv_lora_rank"], data["qk_rope_head_dim"]
    nope, v_dim, experts = data["qk_nope_head_dim"], data["v_head_dim"], data["n_routed_experts"]
    moe_inter, shared, dense = data["moe_intermediate_size"], data["n_shared_experts"], data["first_k_dense_replace"]
    moe = layers - dense
    # Replicated: two layernorms, q_a_proj + its norm, kv_a_proj_with_mqa + its norm; routers; final norm.
    attn_replicated = 2 * h * 2 + fp8(q_lora, h) + 2 * q_lora + fp8(kv_lora + rope, h) + 2 * kv_lora
    replicated = layers * attn_replicated + moe * (2 * experts * h + 4 * experts) + 2 * h
    # Split: embedding and head by vocab; q_b, kv_b by heads (rows), o_proj by heads (columns).
    attn = (
        fp8(heads // tp * (nope + rope), q_lora)
        + fp8(heads // tp * (nope + v_dim), kv_lora)
        + fp8(h, heads // tp * v_dim)
    )
    routed = experts // tp * mlp(moe_inter) if ep else experts * mlp(moe_inter // tp)
    split = 2 * (v // tp) * h * 2 + layers * attn + dense * mlp(data["intermediate_size"] // tp)
    split += moe * (routed + mlp(moe_inter * shared // tp))
    return replicated + split, replicated


@pytest.mark.parametrize("ep", [False, True])
def test_r1_fp8_weight_bytes_per_gpu_on_8_gpus(ep):
    data = json.loads(R1_CONFIG.read_text())
    parallel = parallel_size(ModelConfig.from_dict(data), 8, ep)
    per_gpu, replicated = _r1_fp8_bytes_per_gpu(data, 8, ep)
    assert parallel.weight_bytes_fp8_per_gpu == per_gpu == 85_140_130_848  # 79.3 GiB
    assert parallel.replicated_bytes_fp8_per_gpu == replicated == 1_138_633_568
    assert parallel.loaded_weight_bytes_per_gpu == per_gpu  # an FP8 checkpoint stays FP8 on the GPU
    assert parallel.kv_cache_bytes_per_token_per_gpu == 70_272  # the whole latent on every rank
    assert parallel.routed_experts_per_gpu == (32 if ep else None)
    # 128x128-aligned shards: the per-GPU figure is exactly the checkpoint's split share.
    total = model_size(ModelConfig.from_dict(data)).weight_bytes_fp8
    assert per_gpu == (total - replicated) // 8 + replicated


def test_r1_jobs_on_8_h200():
    config = ModelConfig.from_pretrained(R1_CONFIG)
    for ep in (False, True):
        plan = memory_plan(parallel_size(config, 8, ep), parse_memory_size("141GB"))
        weights = _r1_fp8_bytes_per_gpu(json.loads(R1_CONFIG.read_text()), 8, ep)[0]
        assert plan.free_bytes_per_gpu == 141 * 10**9 - weights
        assert plan.kv_budget_bytes_per_gpu == int(141e9 * 0.9) - weights
        assert plan.kv_cache_bytes_per_job_per_gpu == 70_272 * 131_072
        assert plan.jobs == (int(141e9 * 0.9) - weights) // (70_272 * 131_072) == 4
    assert memory_plan(parallel_size(config, 8), parse_memory_size("141GB"), 1.0).jobs == 6
    with pytest.raises(ConfigError, match="weights alone do not fit"):  # ~169 GB of FP8 per GPU on 4
        memory_plan(parallel_size(config, 4, True), parse_memory_size("141GB"))


@pytest.mark.parametrize("data", [TINY_DEEPSEEK, {**TINY_DEEPSEEK, "q_lora_rank": None, "attention_bias": True}])
@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("ep", [False, True])
def test_ranks_add_up_to_the_whole_model(data, tp, ep):
    """Split parts summed over the ranks are the model's split parts; replicated parts are on every rank."""
    config = ModelConfig.from_dict(data)
    tensors = list(main_tensors(config))
    total = model_size(config).weight_bytes
    ranks, replicated = rank_bytes(config, tensors, tp, ep, 2, None)
    assert len(ranks) == tp and len(set(ranks)) == 1  # every rank holds the same
    assert sum(r - replicated for r in ranks) == total - replicated
    assert sum(ranks) == total + (tp - 1) * replicated
    assert 0 < replicated < total
    if ep:  # each rank holds whole experts, E / tp of them per MoE layer
        owners = [placement(config, t.name, tp, ep).owner for t in tensors if ".mlp.experts." in t.name]
        assert all(owners.count(r) == len(owners) // tp for r in range(tp))


def test_tp1_is_the_whole_model():
    for config in (ModelConfig.from_pretrained(R1_CONFIG), ModelConfig.from_dict(TINY_DEEPSEEK)):
        size, parallel = model_size(config), parallel_size(config, 1)
        assert parallel.weight_bytes_per_gpu == size.weight_bytes
        assert parallel.weight_bytes_fp8_per_gpu == size.weight_bytes_fp8
        assert parallel.kv_cache_bytes_per_token_per_gpu == config.kv_cache_bytes_per_token(2)


def test_every_checkpoint_tensor_has_a_rule():
    for variant in DEEPSEEK_VARIANTS.values():
        config = ModelConfig.from_dict({**TINY_DEEPSEEK, **variant})
        for t in [*main_tensors(config), *mtp_tensors(config)]:
            for ep in (False, True):
                where = placement(config, t.name, 4, ep)
                assert where.dim is None or t.shape[where.dim] % where.parts == 0, t.name
    with pytest.raises(ValueError, match="no tensor-parallel rule"):
        placement(ModelConfig.from_dict(TINY_DEEPSEEK), "model.layers.0.self_attn.mystery.weight", 2)


GQA = {
    "model_type": "llama",
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
}


def test_gqa_kv_heads_split_then_replicated():
    config = ModelConfig.from_dict(GQA)
    head = config.head_dim * 2 * 3 * 2  # K and V, 3 layers, bf16
    assert [kv_cache_bytes_per_token_per_gpu(config, tp) for tp in (1, 2, 4, 8)] == [2 * head, head, head, head]
    # tp=8 > 2 KV heads: each rank holds one KV head's k_proj / v_proj rows (4 ranks share each).
    k = next(t for t in main_tensors(config) if t.name.endswith("k_proj.weight"))
    assert placement(config, k.name, 8).shard(k).shape == (config.head_dim, 64)
    parallel = parallel_size(config, 8)
    assert (
        parallel.weight_bytes_fp8_per_gpu is None
        and parallel.loaded_weight_bytes_per_gpu == parallel.weight_bytes_per_gpu
    )


def test_uneven_splits_are_refused():
    r1 = ModelConfig.from_pretrained(R1_CONFIG)
    with pytest.raises(ConfigError, match="tp=3 does not divide vocab_size=129280"):
        check_parallel(r1, 3)
    twelve_experts = ModelConfig.from_dict({**json.loads(R1_CONFIG.read_text()), "n_routed_experts": 12})
    check_parallel(twelve_experts, 8)  # plain TP splits each expert's width instead
    with pytest.raises(ConfigError, match="tp=8 does not divide n_routed_experts=12"):
        check_parallel(twelve_experts, 8, ep=True)
    with pytest.raises(ConfigError, match="does not divide moe_intermediate_size=70"):
        check_parallel(ModelConfig.from_dict({**TINY_DEEPSEEK, "moe_intermediate_size": 70}), 4)
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        check_parallel(ModelConfig.from_dict({**GQA, "num_attention_heads": 6}), 3)
    with pytest.raises(ConfigError, match="needs a MoE model"):
        check_parallel(ModelConfig.from_dict(GQA), 2, ep=True)
    with pytest.raises(ConfigError, match=">= 1"):
        parallel_size(r1, 0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("141GB", 141 * 10**9),
        ("141GiB", 141 * 2**30),
        ("80G", 80 * 10**9),
        ("80gib", 80 * 2**30),
        ("150000000000", 150 * 10**9),
        ("1.5TB", 1.5e12),
        ("512MiB", 2**29),
        (" 64 GB ", 64 * 10**9),
    ],
)
def test_parse_memory_size(text, expected):
    assert parse_memory_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "141XB", "141iB", "-1GB", "1e9", "141 GB extra"])
def test_parse_memory_size_refuses(text):
    with pytest.raises(ConfigError, match="not a memory size"):
        parse_memory_size(text)
