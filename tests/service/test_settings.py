"""Settings come from PONDER_* variables; production refuses default secrets; the API process stays light."""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from ponder.engine.config import EngineConfig
from ponder.service.settings import Settings
from tests.isolation import modules_imported_with


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("PONDER_MAX_NUM_SEQS", "32")
    monkeypatch.setenv("PONDER_DATABASE_URL", "postgresql://db/ponder")
    settings = Settings(_env_file=None)
    assert settings.engine.max_num_seqs == 32 and settings.database_url == "postgresql://db/ponder"


def test_production_refuses_the_default_secret_and_short_ones(monkeypatch):
    monkeypatch.setenv("PONDER_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="PONDER_SECRET_KEY is left at its default"):
        Settings(_env_file=None)
    for short in ("", "a-real-secret", "s" * 31):  # "" was accepted: every secret then sealed under HKDF("")
        monkeypatch.setenv("PONDER_SECRET_KEY", short)
        with pytest.raises(ValidationError, match="at least 32 characters"):
            Settings(_env_file=None)
    key = secrets.token_urlsafe(32)
    monkeypatch.setenv("PONDER_SECRET_KEY", key)
    assert Settings(_env_file=None).secret_key == key
    monkeypatch.setenv("PONDER_ENVIRONMENT", "development")  # anything goes where nothing is at stake
    monkeypatch.setenv("PONDER_SECRET_KEY", "")
    assert Settings(_env_file=None).secret_key == ""


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("PONDER_MAX_NUM_SEQS", "0")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_engine_settings_are_the_engine_config(monkeypatch, tmp_path):
    """Every EngineConfig field reads PONDER_<FIELD> (environment first, then .env); fields not set
    keep the service's defaults (16 jobs in flight, not the engine's 64)."""
    for field in dataclasses.fields(EngineConfig):
        monkeypatch.delenv(f"PONDER_{field.name.upper()}", raising=False)
    assert Settings(_env_file=None).engine == EngineConfig(max_num_seqs=16)
    monkeypatch.setenv("PONDER_BLOCK_SIZE", "32")
    monkeypatch.setenv("PONDER_FP8_WEIGHTS", "dequantize")
    (tmp_path / ".env").write_text("PONDER_MAX_NUM_SEQS=48\nPONDER_BLOCK_SIZE=64\nPONDER_ENABLE_PREFIX_CACHING=false\n")
    engine = Settings(_env_file=tmp_path / ".env").engine
    assert (engine.block_size, engine.fp8_weights, engine.max_num_seqs) == (32, "dequantize", 48)
    assert engine.enable_prefix_caching is False and engine.max_num_batched_tokens == 2048
    for name, bad, message in [
        ("PONDER_BLOCK_SIZE", "0", "block_size must be positive"),
        ("PONDER_FP8_WEIGHTS", "sometimes", "fp8_weights must be"),
        ("PONDER_DTYPE", "int8", "dtype must be"),
        ("PONDER_MAX_NUM_SEQS", "2000", "PONDER_MAX_NUM_SEQS must be between 1 and 1024"),
        ("PONDER_MAX_MODEL_LEN", "8", "PONDER_MAX_MODEL_LEN must be at least 16"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, bad)
            with pytest.raises(ValidationError, match=message):
                Settings(_env_file=None)


def test_the_api_app_does_not_import_torch_or_workers():
    assert (
        modules_imported_with("ponder.api.app", ("torch", "ponder.workers", "ponder.engine.runtime.model_runner"))
        == "[]"
    )


def test_flower_refuses_default_credentials_outside_development(monkeypatch):
    assert Settings(_env_file=None).flower_basic_auth() == "admin:change-me"  # development only
    monkeypatch.setenv("PONDER_ENVIRONMENT", "test")
    with pytest.raises(ValueError, match="PONDER_FLOWER_PASSWORD"):
        Settings(_env_file=None).flower_basic_auth()
    monkeypatch.setenv("PONDER_FLOWER_PASSWORD", "s3cret:with:colons")
    assert Settings(_env_file=None).flower_basic_auth() == "admin:s3cret:with:colons"
    for name, bad in (("PONDER_FLOWER_USER", "a:b"), ("PONDER_FLOWER_PASSWORD", "a,b")):
        monkeypatch.setenv(name, bad)  # Flower splits its credential list on commas, user:password on ':'
        with pytest.raises(ValidationError):
            Settings(_env_file=None)
        monkeypatch.delenv(name)


def test_ponder_flower_refuses_default_credentials_in_one_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PONDER_FLOWER", "FLOWER_"))}
    env |= {
        "PONDER_ENVIRONMENT": "production",
        "PONDER_SECRET_KEY": "x" * 32,
        "PONDER_REDIS_URL": "redis://127.0.0.1:1/0",
    }
    command = [sys.executable, "-m", "ponder", "flower"]
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "PONDER_FLOWER_PASSWORD" in result.stderr and "Traceback" not in result.stderr


def test_metrics_settings(monkeypatch):
    settings = Settings(_env_file=None)
    assert settings.metrics_enabled and settings.worker_metrics_port == 9101
    monkeypatch.setenv("PONDER_WORKER_METRICS_PORT", "0")  # off
    assert Settings(_env_file=None).worker_metrics_port == 0
    monkeypatch.setenv("PONDER_WORKER_METRICS_PORT", "70000")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_every_path_derives_from_the_data_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("PONDER_DATA_DIR", str(tmp_path / "data"))
    settings = Settings(_env_file=None)
    assert settings.database_url == f"sqlite:///{tmp_path / 'data' / 'ponder.db'}"
    for path in (settings.files_dir, settings.flower_db, settings.beat_schedule):
        assert path.parent == tmp_path / "data"
    monkeypatch.setenv("PONDER_FILES_DIR", str(tmp_path / "elsewhere"))  # each still has its own setting
    assert Settings(_env_file=None).files_dir == tmp_path / "elsewhere"
    monkeypatch.delenv("PONDER_DATA_DIR")
    assert Settings(_env_file=None).database_url == "sqlite:///var/ponder.db"  # `make run`'s embedded default


PATHS_SEEN_BY_A_CHILD = """
import json
from ponder.cli.devstack import dev_key_file
from ponder.engine.model_store import model_dir
from ponder.service.settings import Settings
s = Settings()
paths = [s.data_dir, s.database_url.removeprefix("sqlite:///"), s.files_dir, s.flower_db, s.beat_schedule]
paths.append(dev_key_file())
print(json.dumps({"paths": [str(p) for p in paths], "model_dir": str(model_dir())}))
"""


def test_the_tests_keep_every_path_out_of_the_checkout(tmp_path):
    """This session's processes, started in the checkout as the stacks start theirs, store nothing
    in its var/ (where `make run` keeps a developer's data) and read no .env there: every path
    setting points into the session's temporary directory (tests/conftest.py)."""
    root = Path(__file__).resolve().parents[2]
    (tmp_path / ".env").write_text(f"PONDER_DATABASE_URL=sqlite:///{root / 'var' / 'ponder.db'}\n")
    for cwd in (root, tmp_path):  # tmp_path: a .env in the working directory is not read either
        result = subprocess.run([sys.executable, "-c", PATHS_SEEN_BY_A_CHILD], cwd=cwd, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        seen = json.loads(result.stdout)
        data_dir = Path(os.environ["PONDER_DATA_DIR"])
        assert not data_dir.is_relative_to(root)
        for path in map(Path, seen["paths"]):
            assert (cwd / path).resolve().is_relative_to(data_dir.resolve()), path
        assert not Path(seen["model_dir"]).resolve().is_relative_to(root)
