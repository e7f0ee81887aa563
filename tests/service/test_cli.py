"""`ponder models ...` as a user runs it: real subprocesses, real downloads from the package index."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

PONDER = [sys.executable, "-m", "service.cli"]
ROOT = Path(__file__).resolve().parents[2]


def ponder(*args: str, model_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PONDER_MODEL_DIR": str(model_dir), "COLUMNS": "200"}
    return subprocess.run([*PONDER, *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)


def test_pull_list_and_info(tmp_path):
    result = ponder("models", "pull", "smollm2-135m", model_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    gguf = tmp_path / "smollm2-135m" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert result.stdout.strip() == str(gguf)
    assert gguf.stat().st_size > 90_000_000
    assert "extracting" in result.stderr  # the progress display
    assert not [p for p in (tmp_path / "smollm2-135m").iterdir() if p.name.startswith(".")], "temp files left"

    listing = ponder("models", "list", model_dir=tmp_path)
    assert "smollm2-135m" in listing.stdout and "gguf" in listing.stdout

    info = ponder("models", "info", "smollm2-135m", model_dir=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "134,515,008" in info.stdout  # SmolLM2-135M's parameter count
    assert "23,040" in info.stdout  # KV bytes/token in bf16: 30 layers x 2 x 3 kv heads x 64 x 2 bytes


def test_make_tiny(tmp_path):
    result = ponder("models", "make-tiny", "tiny-llama", "-o", str(tmp_path / "t"), model_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "t" / "config.json").is_file()


def test_errors_are_one_line_not_tracebacks(tmp_path):
    for args in (
        ("models", "pull", "no-such-model"),
        ("models", "make-tiny", "tiny-gpt"),
        ("models", "info", "/nonexistent/model"),
        ("models", "info", str(tmp_path)),  # a directory without config.json
    ):
        result = ponder(*args, model_dir=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error:"), (args, result.stderr)
        assert "Traceback" not in result.stderr
