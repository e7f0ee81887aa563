"""The model cache: aliases, deterministic tiny models, pulling from PyPI, and cache sizing."""

from __future__ import annotations

import json

import pytest

from ponder.engine.config import ModelConfig
from ponder.engine.errors import ModelLoadError
from ponder.engine.model_store import list_cached, resolve_model
from ponder.engine.tools.tiny import MARKER, make_tiny


def file_bytes(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tiny_models_are_deterministic(tmp_path, name):
    first = make_tiny(name, tmp_path / "a")
    second = make_tiny(name, tmp_path / "b")
    assert file_bytes(first) == file_bytes(second)
    config = json.loads((first / "config.json").read_text())
    assert config["model_type"] == name.removeprefix("tiny-")
    assert (first / "tokenizer.json").is_file() and (first / "tokenizer_config.json").is_file()


def test_alias_is_made_on_first_use_and_remade_when_stale(tmp_path, monkeypatch):
    monkeypatch.setenv("PONDER_MODEL_DIR", str(tmp_path))
    path = resolve_model("tiny-qwen2")
    assert path == tmp_path / "tiny-qwen2" and (path / "model.safetensors").is_file()
    assert [m.name for m in list_cached()] == ["tiny-qwen2"]
    (path / MARKER).write_text(json.dumps({"fingerprint": "old"}))
    (path / "model.safetensors").write_bytes(b"stale")
    resolve_model("tiny-qwen2")
    assert (path / "model.safetensors").stat().st_size > 100


def test_paths_win_over_aliases(tmp_path, monkeypatch):
    made = make_tiny("tiny-llama", tmp_path / "mine")
    assert resolve_model(str(made)) == made
    monkeypatch.setenv("PONDER_MODEL_DIR", str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="not in the cache"):
        resolve_model("smollm2-135m", fetch=False)


def test_engine_allocates_the_configured_bytes_per_token(make_llm):
    llm = make_llm("smollm2-135m")
    config = ModelConfig.from_pretrained(resolve_model("smollm2-135m"))
    assert llm.engine.model_runner.kv_cache_bytes_per_token == config.kv_cache_bytes_per_token(dtype_bytes=4)
    assert config.kv_cache_bytes_per_token(dtype_bytes=2) == 30 * 2 * 3 * 64 * 2


def test_rope_settings_from_either_config_spelling():
    base = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
    }
    scaling = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    old = ModelConfig.from_dict({**base, "rope_theta": 5e5, "rope_scaling": {"rope_type": "llama3", **scaling}})
    new = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, **scaling}})
    assert old.rope_theta == new.rope_theta == 5e5
    assert old.rope_scaling == new.rope_scaling == {"rope_type": "llama3", **scaling}
    plain = ModelConfig.from_dict({**base, "rope_parameters": {"rope_type": "default", "rope_theta": 1e4}})
    assert plain.rope_scaling is None and plain.rope_theta == 1e4
    with pytest.raises(ModelLoadError, match="missing or invalid field"):
        ModelConfig.from_dict({"model_type": "llama"})
