"""The tiny DeepSeek-V3 checkpoints: official layout and config, loadable by transformers, R1's
tokenizer and chat template on tiny-r1, FP8 as the official checkpoints store it on tiny-r1-fp8,
and the loader's dequantised stream equal to the independent reference copy."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ponder.engine.chat import apply_r1_conventions
from ponder.engine.config import ModelConfig
from ponder.engine.model_store import resolve_model
from ponder.engine.runtime.fp8 import scale_shape
from ponder.engine.runtime.loader import iter_checkpoint
from ponder.engine.tokenizer import Tokenizer
from ponder.engine.tools.tiny import DEEPSEEK_TINIES, FP8_QUANTIZATION_CONFIG, FP8_WEIGHT, make_tiny, r1_tokenizer_dir

SMALL = ["tiny-dsv3-noq", "tiny-dsv3-groups", "tiny-dsv3-norope", "tiny-dsv3-dense"]
USER, ASSISTANT, THINK, END_THINK = 128803, 128804, 128798, 128799


def config_of(name: str) -> dict:
    return json.loads((resolve_model(name) / "config.json").read_text())


def headers(path: Path) -> dict[str, tuple[str, str, list[int]]]:
    """name -> (file, dtype, shape) from the safetensors headers, reading no tensor."""
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                tensor = f.get_slice(name)
                out[name] = (file.name, tensor.get_dtype(), tensor.get_shape())
    return out


def read(path: Path, names) -> dict[str, torch.Tensor]:
    where = {name: file for name, (file, _, _) in headers(path).items()}
    out = {}
    for name in names:
        with safe_open(path / where[name], framework="pt") as f:
            out[name] = f.get_tensor(name)
    return out


@pytest.mark.parametrize("name", [*SMALL, "tiny-r1", "tiny-r1-fp8-dequantized"])
def test_transformers_loads_every_tensor(name):
    from transformers import DeepseekV3ForCausalLM

    model, info = DeepseekV3ForCausalLM.from_pretrained(
        resolve_model(name), dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["mismatched_keys"] and not info["error_msgs"]
    # transformers skips the MTP layer by name only at index 61; a tiny's MTP layer (index =
    # num_hidden_layers) is reported as unexpected, and nothing else is
    mtp = f"model.layers.{model.config.num_hidden_layers}."
    assert all(key.startswith(mtp) for key in info["unexpected_keys"])
    assert bool(info["unexpected_keys"]) == bool(config_of(name)["num_nextn_predict_layers"])
    router = model.model.layers[-1].mlp.gate
    assert router.e_score_correction_bias.abs().min() > 0 and router.weight.abs().min() > 0  # loaded, not initialised
    ids = torch.tensor([[0, 1, 5, 50, 100, 150, 200, 250, 300]])
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all() and logits[0, -1].std() > 1  # well spread


def test_configs():
    for name in DEEPSEEK_TINIES:
        config = config_of(name)
        assert config["model_type"] == "deepseek_v3" and config["architectures"] == ["DeepseekV3ForCausalLM"]
        assert config["rope_interleave"] and config["norm_topk_prob"]
        assert (config["topk_method"], config["scoring_func"]) == ("noaux_tc", "sigmoid")
        assert ModelConfig.from_pretrained(resolve_model(name)).attention_kind == "mla"
    r1 = config_of("tiny-r1")
    assert (r1["vocab_size"], r1["bos_token_id"], r1["eos_token_id"]) == (129280, 0, 1)
    assert r1["rope_scaling"]["type"] == "yarn" and r1["rope_scaling"]["factor"] == 32
    assert r1["num_nextn_predict_layers"] == 1 and "quantization_config" not in r1
    assert config_of("tiny-r1-fp8")["quantization_config"] == FP8_QUANTIZATION_CONFIG
    assert config_of("tiny-dsv3-noq")["q_lora_rank"] is None
    norope = ModelConfig.from_pretrained(resolve_model("tiny-dsv3-norope"))
    assert norope.rope_scaling is None and "rope_scaling" not in norope.extra and "rope_parameters" not in norope.extra
    dense = ModelConfig.from_pretrained(resolve_model("tiny-dsv3-dense"))
    assert "rope_scaling" not in dense.extra and dense.rope_scaling["rope_type"] == "yarn"
    assert (dense.rope_theta, dense.rope_scaling["factor"], dense.extra["first_k_dense_replace"]) == (10000.0, 4, 2)


def test_tiny_r1_layout_has_per_expert_tensors_and_an_mtp_layer():
    names = set(headers(resolve_model("tiny-r1")))
    assert "model.layers.0.mlp.gate_proj.weight" in names and "model.layers.0.mlp.gate.weight" not in names
    for e in range(16):
        assert f"model.layers.3.mlp.experts.{e}.down_proj.weight" in names
    for suffix in (
        "mlp.gate.weight",
        "mlp.gate.e_score_correction_bias",
        "mlp.shared_experts.up_proj.weight",
        "self_attn.q_a_proj.weight",
        "self_attn.q_a_layernorm.weight",
        "self_attn.q_b_proj.weight",
        "self_attn.kv_a_proj_with_mqa.weight",
        "self_attn.kv_a_layernorm.weight",
        "self_attn.kv_b_proj.weight",
        "self_attn.o_proj.weight",
    ):
        assert f"model.layers.1.{suffix}" in names and f"model.layers.4.{suffix}" in names
    mtp = {"embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head"}
    assert {f"model.layers.4.{m}.weight" for m in mtp} <= names
    assert not any(n.startswith("model.layers.5.") for n in names)
    assert "model.layers.0.self_attn.q_proj.weight" in headers(resolve_model("tiny-dsv3-noq"))


def test_fp8_checkpoint_is_laid_out_like_the_official_one():
    tensors = headers(resolve_model("tiny-r1-fp8"))
    index = json.loads((resolve_model("tiny-r1-fp8") / "model.safetensors.index.json").read_text())["weight_map"]
    assert index == {name: file for name, (file, _, _) in tensors.items()} and len(set(index.values())) == 3
    quantised = [n for n in tensors if FP8_WEIGHT.search(n)]
    # attention of 4 layers + the MTP layer, layer 0's dense MLP, routed + shared experts of 3 layers + MTP
    assert len(quantised) == 5 * 5 + 3 + 4 * (16 + 1) * 3
    before = after = 0
    for name in quantised:
        file, dtype, shape = tensors[name]
        scale_file, scale_dtype, shape_of_scale = tensors[name + "_scale_inv"]
        assert dtype == "F8_E4M3" and scale_dtype == "F32" and tuple(shape_of_scale) == scale_shape(shape)
        before += scale_file < file
        after += scale_file > file
    assert before and after  # some scales sit in an earlier shard than their weight, some in a later one
    for name, (_, dtype, _) in tensors.items():
        if not FP8_WEIGHT.search(name) and not name.endswith("_scale_inv"):
            assert dtype == ("F32" if name.endswith("e_score_correction_bias") else "BF16"), name
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert tensors[name][1] == "BF16"
    assert tensors["model.layers.4.eh_proj.weight"][1] == tensors["model.layers.4.shared_head.head.weight"][1] == "BF16"


def test_fp8_checkpoint_holds_tiny_r1s_weights():
    plain, fp8 = resolve_model("tiny-r1"), resolve_model("tiny-r1-fp8")
    names = [n for n in headers(plain) if n.startswith("model.layers.1.") or n.startswith("model.layers.4.e")]
    originals = read(plain, names)
    stored = read(fp8, [*names, *(n + "_scale_inv" for n in names if FP8_WEIGHT.search(n))])
    config = ModelConfig.from_pretrained(fp8)
    dequantised = {n: t for _, n, t in iter_checkpoint(fp8, config) if n in originals}
    for name, original in originals.items():
        if not FP8_WEIGHT.search(name):
            assert torch.equal(stored[name], original), name
            continue
        scale = stored[name + "_scale_inv"]
        per_element = scale.repeat_interleave(128, 0).repeat_interleave(128, 1)[
            : original.shape[0], : original.shape[1]
        ]
        error = (dequantised[name] - original.float()).abs()
        assert (error <= original.float().abs() / 16 + per_element / 1024).all(), name


def test_loader_stream_equals_the_dequantized_reference():
    fp8, reference = resolve_model("tiny-r1-fp8"), resolve_model("tiny-r1-fp8-dequantized")
    assert "quantization_config" not in config_of("tiny-r1-fp8-dequantized")
    seen = set()
    with safe_open(reference / "model.safetensors", framework="pt") as expected:
        for _, name, tensor in iter_checkpoint(fp8, ModelConfig.from_pretrained(fp8)):
            want = expected.get_tensor(name)
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), name
            seen.add(name)
        assert seen == set(expected.keys())
    assert any(FP8_WEIGHT.search(n) for n in seen) and not any(n.endswith("_scale_inv") for n in seen)


def test_r1_tokenizer_and_chat_template():
    path = resolve_model("tiny-r1")
    assert (path / "tokenizer.json").read_bytes() == (r1_tokenizer_dir() / "tokenizer.json").read_bytes()
    tok = Tokenizer.from_pretrained(path)
    ids = [tok.token_to_id(t) for t in ("<｜User｜>", "<｜Assistant｜>", "<think>", "</think>")]
    assert ids == [USER, ASSISTANT, THINK, END_THINK]
    assert (tok.bos_token_id, tok.eos_token_ids) == (0, [1])
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0

    messages = apply_r1_conventions([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}])
    prompt = tok.apply_chat_template(messages)
    assert prompt == "<｜begin▁of▁sentence｜><｜User｜>Be brief.\n\n2+2?<｜Assistant｜><think>\n"
    ids = tok.encode_chat(messages)
    assert ids[0] == 0 and ids[1] == USER and ids[-3:-1] == [ASSISTANT, THINK] and tok.decode(ids[-1:]) == "\n"
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "<think>\nwhy\n</think>\n\nb"},
        {"role": "user", "content": "c"},
    ]
    assert tok.apply_chat_template(history) == (
        "<｜begin▁of▁sentence｜><｜User｜>a<｜Assistant｜>\n\nb<｜end▁of▁sentence｜><｜User｜>c<｜Assistant｜><think>\n"
    )
    assert tok.decode([THINK, 2000, END_THINK]).startswith("<think>")  # think tags are not special: they decode

    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(path)
    assert reference.apply_chat_template(history, tokenize=False, add_generation_prompt=True) == (
        tok.apply_chat_template(history)
    )


def digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("name", SMALL)
def test_small_tinies_are_deterministic(tmp_path, name):
    assert digest(make_tiny(name, tmp_path / "a")) == digest(make_tiny(name, tmp_path / "b"))


def test_tiny_r1_fp8_is_deterministic(tmp_path):
    assert digest(make_tiny("tiny-r1-fp8", tmp_path / "again")) == digest(resolve_model("tiny-r1-fp8"))
