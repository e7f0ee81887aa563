"""`ponder models ...` as a user runs it: real subprocesses, real downloads from the package index."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

PONDER = [sys.executable, "-m", "ponder"]
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


R1_CONFIG = ROOT / "tests" / "data" / "deepseek-r1-config.json"


def test_info_deepseek_r1_memory_figures(tmp_path):
    model = tmp_path / "r1"
    model.mkdir()
    (model / "config.json").write_text(R1_CONFIG.read_text())
    for target in (model, R1_CONFIG):  # a model directory or the config.json itself
        result = ponder("models", "info", str(target), model_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        assert "70,272" in result.stdout  # KV bytes/token in bf16: 61 x (512 + 64) x 2
        assert "9,210,691,584" in result.stdout  # ... for 131,072 tokens
        assert "671,026,419,200" in result.stdout  # main-model parameters
        assert "37,552,297,472" in result.stdout  # activated per token
        assert "71.1x" in result.stdout  # what an MHA cache would take
    lines = {line.split("  ")[0]: line for line in result.stdout.splitlines()}
    assert "13,463,426,304" in lines["parameters (MTP)"]
    assert "673,150,611,808" in lines["weight bytes (fp8 ckpt)"]

    as_json = ponder("models", "info", str(R1_CONFIG), "--json", model_dir=tmp_path)
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    assert info["kv_cache_bytes_per_token"] == 70_272 and info["kv_cache_bytes"] == 9_210_691_584
    assert info["total_parameters"] == info["parameters"] + info["mtp_parameters"]


def test_info_bad_configs_are_one_line_errors(tmp_path):
    (tmp_path / "not-json").mkdir()
    (tmp_path / "not-json" / "config.json").write_text("{not json")
    incomplete = {k: v for k, v in json.loads(R1_CONFIG.read_text()).items() if k != "kv_lora_rank"}
    (tmp_path / "incomplete.json").write_text(json.dumps(incomplete))
    for args in (
        (str(tmp_path / "not-json"),),
        (str(tmp_path / "not-json" / "config.json"),),
        (str(tmp_path / "incomplete.json"),),
        (str(R1_CONFIG), "--dtype", "int3"),
        (str(R1_CONFIG), "--tp", "3"),  # 3 divides neither the 128 heads nor the 129,280-token vocab
        (str(R1_CONFIG), "--tp", "4", "--ep", "--gpu-memory", "141GB"),  # ~169 GB of FP8 weights per GPU
        (str(R1_CONFIG), "--tp", "8", "--gpu-memory", "lots"),
    ):
        result = ponder("models", "info", *args, model_dir=tmp_path)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("error:") and len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "Traceback" not in result.stderr and not result.stdout


def test_info_deepseek_r1_on_8_h200(tmp_path):
    """R1 FP8 on 8 x H200: per-GPU weights and KV worked out from the config, and the 128K-token
    jobs that fit, equal to what the engine's functions compute."""
    from ponder.engine.config import ModelConfig
    from ponder.engine.tools.parallel_size import memory_plan, parallel_size

    config = ModelConfig.from_pretrained(R1_CONFIG)
    for ep in (True, False):
        flags = ["--tp", "8", *(["--ep"] if ep else []), "--gpu-memory", "141GB"]
        result = ponder("models", "info", str(R1_CONFIG), *flags, model_dir=tmp_path)
        assert result.returncode == 0, result.stderr
        rows = {line[:28].strip(): line[28:].strip() for line in result.stdout.splitlines()}
        parallel = parallel_size(config, 8, ep)
        plan = memory_plan(parallel, 141 * 10**9, 0.9, 131_072)
        assert rows["parallel"].startswith("tensor parallel over 8 GPUs")
        assert ("32 routed experts per GPU" in rows["parallel"]) == ep
        assert rows["weight bytes/GPU (fp8 ckpt)"].startswith(f"{parallel.weight_bytes_fp8_per_gpu:,} ")
        assert rows["KV/token per GPU (bfloat16)"].startswith("70,272 (MLA latent, whole on every GPU)")
        assert rows["free per GPU after weights"].startswith(f"{plan.free_bytes_per_gpu:,} ")
        assert rows["KV budget per GPU"].startswith(f"{plan.kv_budget_bytes_per_gpu:,} ")
        jobs = int(rows["131,072-token jobs"].split()[0])
        assert jobs == plan.jobs and jobs > 0
        assert "70,272" in result.stdout and "671,026,419,200" in result.stdout  # the totals still there

    as_json = ponder(
        "models", "info", str(R1_CONFIG), "--tp", "8", "--ep", "--gpu-memory", "141GB", "--json", model_dir=tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    info = json.loads(as_json.stdout)
    parallel = parallel_size(config, 8, True)
    assert info["tensor_parallel"] == 8 and info["expert_parallel"] and info["routed_experts_per_gpu"] == 32
    assert info["weight_bytes_per_gpu"] == parallel.weight_bytes_fp8_per_gpu and info["weights_per_gpu_fp8"]
    assert info["kv_cache_bytes_per_token_per_gpu"] == 70_272
    assert info["gpu_memory_bytes"] == 141 * 10**9 and info["jobs"] == memory_plan(parallel, 141 * 10**9).jobs
    assert info["kv_cache_bytes_per_token"] == 70_272  # today's figures unchanged


def test_info_counts_the_mtp_layer_with_mtp(tmp_path):
    """--mtp: the MTP layer a CUDA worker loads to draft tokens (without its embedding and head
    copies) and one more layer of latent cache per token, on every GPU."""
    from ponder.engine.config import ModelConfig
    from ponder.engine.tools.parallel_size import parallel_size

    config = ModelConfig.from_pretrained(R1_CONFIG)
    result = ponder("models", "info", str(R1_CONFIG), "--tp", "8", "--mtp", "--json", model_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    with_mtp, without = parallel_size(config, 8, mtp=True), parallel_size(config, 8)
    assert info["mtp_layer"] and info["weight_bytes_per_gpu"] == with_mtp.weight_bytes_fp8_per_gpu
    assert 1.5e9 < with_mtp.weight_bytes_fp8_per_gpu - without.weight_bytes_fp8_per_gpu < 2e9  # ~11.7 GB / 8
    assert info["kv_cache_bytes_per_token_per_gpu"] == 62 * (512 + 64) * 2 == 71_424
