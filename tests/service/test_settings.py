"""Settings come from PONDER_* variables; production refuses default secrets; the API process stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from service.settings import Settings


def test_environment_variables(monkeypatch):
    monkeypatch.setenv("PONDER_MAX_NUM_SEQS", "32")
    monkeypatch.setenv("PONDER_DATABASE_URL", "postgresql://db/ponder")
    settings = Settings(_env_file=None)
    assert settings.max_num_seqs == 32 and settings.database_url == "postgresql://db/ponder"


def test_production_refuses_the_default_secret(monkeypatch):
    monkeypatch.setenv("PONDER_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="PONDER_SECRET_KEY"):
        Settings(_env_file=None)
    monkeypatch.setenv("PONDER_SECRET_KEY", "a-real-secret")
    assert Settings(_env_file=None).secret_key == "a-real-secret"


def test_invalid_values_are_refused(monkeypatch):
    monkeypatch.setenv("PONDER_MAX_NUM_SEQS", "0")
    with pytest.raises(ValidationError):
        Settings(_env_file=None)


def test_the_api_app_does_not_import_torch_or_workers():
    code = (
        "import sys, service.app\n"
        "print(sorted(m for m in ('torch', 'workers', 'engine.model_runner') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
