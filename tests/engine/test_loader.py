"""Checkpoint loading: sharded and single-file safetensors, GGUF, and clear errors for broken inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from ponder.engine import SamplingParams
from ponder.engine.errors import ModelLoadError
from ponder.engine.model_store import resolve_model
from ponder.engine.runtime import LLM


@pytest.fixture
def tiny_copy(tmp_path) -> Path:
    """A private copy of tiny-qwen2 (single safetensors file) to break."""
    target = tmp_path / "model"
    shutil.copytree(resolve_model("tiny-qwen2"), target)
    return target


def load(path: Path) -> LLM:
    return LLM(str(path), num_kv_blocks=8)


def test_sharded_checkpoint_loads(make_llm):
    path = resolve_model("tiny-llama")
    assert (path / "model.safetensors.index.json").is_file() and len(list(path.glob("*.safetensors"))) == 2
    (out,) = make_llm("tiny-llama").generate(list(b"hi"), SamplingParams(temperature=0, max_tokens=4))
    assert len(out.token_ids) == 4


def test_missing_config(tiny_copy):
    (tiny_copy / "config.json").unlink()
    with pytest.raises(ModelLoadError, match=r"config\.json not found"):
        load(tiny_copy)


def test_unsupported_model_type(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(ModelLoadError, match=r"config\.json: unsupported model_type 'gpt_neox'"):
        load(tiny_copy)


def test_sliding_window_is_refused(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(ModelLoadError, match="sliding-window attention"):
        load(tiny_copy)


def test_missing_tokenizer(tiny_copy):
    (tiny_copy / "tokenizer.json").unlink()
    with pytest.raises(ModelLoadError, match=r"tokenizer\.json"):
        load(tiny_copy)


def test_truncated_safetensors_names_the_file(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors: corrupt or truncated"):
        load(tiny_copy)


def test_garbage_header_names_the_file(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    weights.write_bytes(b"\xff" * 64 + weights.read_bytes()[64:])
    with pytest.raises(ModelLoadError, match=r"model\.safetensors"):
        load(tiny_copy)


def test_shape_mismatch_names_file_and_tensor(tiny_copy):
    config = json.loads((tiny_copy / "config.json").read_text())
    (tiny_copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 100}))
    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: tensor model\.layers\.0\.mlp\.\w+_proj\.weight: expected"
    ):
        load(tiny_copy)


def test_missing_tensor_is_named(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match=r"lacks tensors: model\.layers\.1\.self_attn\.qkv_proj\.weight\[k\]"):
        load(tiny_copy)


def test_unexpected_tensor_is_named(tiny_copy):
    weights = tiny_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mystery.weight"] = tensors["model.norm.weight"].clone()
    save_file(tensors, weights)
    with pytest.raises(ModelLoadError, match=r"tensor model\.layers\.0\.mystery\.weight: not a parameter"):
        load(tiny_copy)


def test_missing_shard_is_named(tmp_path):
    target = tmp_path / "sharded"
    shutil.copytree(resolve_model("tiny-llama"), target)
    (target / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelLoadError, match=r"model-00002-of-00002\.safetensors: shard listed"):
        load(target)


def test_truncated_gguf(tmp_path):
    source = resolve_model("smollm2-135m")
    broken = tmp_path / "broken.gguf"
    with open(source, "rb") as f:
        broken.write_bytes(f.read(4_000_000))  # the header survives, the tensor data does not
    with pytest.raises(ModelLoadError, match=r"broken\.gguf: tensor \S+: cannot dequantise"):
        load(broken)


def test_not_a_gguf(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelLoadError, match=r"fake\.gguf: not a readable GGUF file"):
        load(fake)


def test_unknown_name():
    with pytest.raises(ModelLoadError, match="not a known alias"):
        LLM("no-such-model-anywhere")
