"""`ponder worker`'s start-up check (ponder/workers/device_check.py): the arithmetic on plain numbers, so it
runs on CPU; device counts and memory are arguments, as the worker passes what torch reports."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ponder.engine.config import EngineConfig, ModelConfig
from ponder.engine.errors import ConfigError
from ponder.engine.tools.model_size import model_size
from ponder.engine.tools.parallel_size import parallel_size
from ponder.workers.device_check import GiB, check_devices, check_worker_devices, model_needs

ROOT = Path(__file__).resolve().parents[2]
R1_CONFIG = ROOT / "tests" / "data" / "deepseek-r1-config.json"
R1 = ModelConfig.from_pretrained(R1_CONFIG)
H200, H100 = 141 * 10**9, 80 * 10**9  # what torch reports as total_memory, near enough
LLAMA = ModelConfig.from_dict(
    {
        "model_type": "llama",
        "vocab_size": 1000,
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 4,
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
    }
)


def cuda(**config) -> EngineConfig:
    return EngineConfig(device="cuda", dtype="bfloat16", **config)


def test_r1_fp8_needs_its_fp8_weights_over_the_ranks_plus_one_full_length_job():
    needs = model_needs(R1, cuda(num_speculative_tokens=0), tensor_parallel_size=8)
    assert needs.fp8 and needs.max_model_len == R1.max_position_embeddings == 163840
    # ~671B parameters as FP8 (1 byte) plus block scales and the bf16 embeddings: about 627 GiB in
    # all; an eighth of it, or a little more where embeddings and norms are whole on every rank
    whole = model_size(R1).weight_bytes_fp8
    assert whole is not None and 600 * GiB < whole < 650 * GiB
    assert -(-whole // 8) <= needs.weight_bytes_per_rank < whole // 8 + 2 * GiB
    # MLA: the latent cache (512 + 64 per layer and token, bf16) is whole on every rank
    assert needs.kv_bytes_per_rank == 61 * (512 + 64) * 2 * 163840
    assert needs.bytes_per_rank == needs.weight_bytes_per_rank + needs.kv_bytes_per_rank
    check_devices(needs, "cuda", 8, [H200] * 8)  # fits: about 89 GiB a rank


def test_speculative_decoding_adds_the_mtp_layer_and_its_cache():
    # On CUDA R1 drafts with its MTP layer by default: one more MoE decoder layer (its embedding and
    # head copies not loaded) and one more layer of latent cache per token on every rank.
    plain, drafting = model_needs(R1, cuda(num_speculative_tokens=0), 8), model_needs(R1, cuda(), 8)
    assert drafting == model_needs(R1, cuda(num_speculative_tokens=1), 8)
    assert drafting.kv_bytes_per_rank == 62 * (512 + 64) * 2 * 163840
    mtp = parallel_size(R1, 8, mtp=True).weight_bytes_fp8_per_gpu
    assert drafting.weight_bytes_per_rank == mtp
    assert 1 * GiB < drafting.weight_bytes_per_rank - plain.weight_bytes_per_rank < 2 * GiB  # ~11.7 GB / 8
    check_devices(drafting, "cuda", 8, [H200] * 8)


def test_expert_parallel_counts_whole_experts_per_rank():
    # EP (engine.enable_expert_parallel): 32 of R1's 256 routed experts whole on each of 8 ranks,
    # model_size's `--ep` rule; on one rank it changes nothing.
    needs = model_needs(R1, cuda(enable_expert_parallel=True), tensor_parallel_size=8)
    shares = parallel_size(R1, 8, ep=True, mtp=True)  # drafting by default on CUDA
    assert shares.routed_experts_per_gpu == 32
    assert needs.weight_bytes_per_rank == shares.weight_bytes_fp8_per_gpu
    assert model_needs(R1, cuda(enable_expert_parallel=True), 1) == model_needs(R1, cuda(), 1)


def test_dequantized_weights_count_at_the_dtype():
    kept, dequantized = model_needs(R1, cuda(), 8), model_needs(R1, cuda(fp8_weights="dequantize"), 8)
    assert not dequantized.fp8 and dequantized.weight_bytes_per_rank > 1.9 * kept.weight_bytes_per_rank
    with pytest.raises(ConfigError, match=r"each GPU needs at least 1\d\d\.\d GiB"):
        check_devices(dequantized, "cuda", 8, [H200] * 8)
    # off CUDA, "auto" dequantises (ponder/engine/runtime/loader.py keeps_fp8)
    assert not model_needs(R1, EngineConfig(device="cpu", dtype="bfloat16"), 1).fp8


def test_too_few_devices_says_how_many_it_sees():
    needs = model_needs(R1, cuda(), 8)
    with pytest.raises(ConfigError, match="needs CUDA devices 0..7, but torch sees 4"):
        check_devices(needs, "cuda", 4, [H200] * 4)
    with pytest.raises(ConfigError, match="needs CUDA devices 2..9, but torch sees 8"):
        check_devices(needs, "cuda:2", 8, [H200] * 8)


def test_no_device_says_why():
    needs = model_needs(LLAMA, cuda(), 1)
    with pytest.raises(ConfigError, match="torch sees no CUDA device: this torch is a CPU build"):
        check_devices(needs, "cuda", 0, [], cuda_build=False)
    with pytest.raises(ConfigError, match="torch sees no CUDA device: no GPU is visible"):
        check_devices(needs, "cuda", 0, [], cuda_build=True)


def test_too_little_memory_names_the_devices_and_the_sizes():
    needs = model_needs(R1, cuda(), 8)
    with pytest.raises(ConfigError) as error:
        check_devices(needs, "cuda", 8, [H100] * 8)
    message = str(error.value)
    assert "PONDER_TENSOR_PARALLEL_SIZE=8" in message and "devices 0, 1, 2, 3, 4, 5, 6, 7 have 74.5 GiB" in message
    assert "of weights (FP8)" in message and "KV cache for one 163840-token job" in message
    assert "\n" not in message  # `ponder worker` prints it as one line
    # one small device among large ones is named alone
    with pytest.raises(ConfigError, match="device 5 has 74.5 GiB"):
        check_devices(needs, "cuda", 8, [H200] * 5 + [H100] + [H200] * 2)


def test_a_shorter_max_model_len_needs_less_kv():
    full, short = model_needs(LLAMA, cuda(), 1), model_needs(LLAMA, cuda(max_model_len=1024), 1)
    assert full.kv_bytes_per_rank == LLAMA.kv_cache_bytes_per_token(2) * 4096 == 4 * short.kv_bytes_per_rank
    assert full.weight_bytes_per_rank == short.weight_bytes_per_rank


def test_mha_kv_heads_split_over_the_ranks():
    one, two, eight = (model_needs(LLAMA, cuda(), size).kv_bytes_per_rank for size in (1, 2, 8))
    assert two == one // 2  # 2 KV heads: one per rank
    assert eight == two  # more ranks than KV heads: each rank still holds one head


def test_nothing_to_check_off_cuda():
    check_worker_devices("no-such-model", EngineConfig(device="cpu"))  # returns before resolving the model


def test_a_model_that_does_not_split_evenly_is_refused():
    with pytest.raises(ConfigError):
        model_needs(LLAMA, cuda(), 3)  # 8 heads over 3 ranks


def test_ponder_worker_says_what_is_missing_in_one_line(tmp_path):
    """The real command on this machine's torch: R1 over 8 GPUs where torch sees fewer (a CPU
    build sees none). The check runs before the engine loads, so a config.json is all it reads."""
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 8:
        pytest.skip("this machine has 8 GPUs: the check would pass")
    shutil.copy(R1_CONFIG, tmp_path / "config.json")
    env = {
        **os.environ,
        "PONDER_MODEL": str(tmp_path),
        "PONDER_DEVICE": "cuda",
        "PONDER_DTYPE": "bfloat16",
        "PONDER_TENSOR_PARALLEL_SIZE": "8",
        "COLUMNS": "80",
    }
    result = subprocess.run(
        [sys.executable, "-m", "ponder", "worker"], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("error: PONDER_DEVICE=cuda with PONDER_TENSOR_PARALLEL_SIZE=8")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "torch sees no CUDA device" in result.stderr or "but torch sees" in result.stderr


def test_the_devices_are_counted_before_the_model_is_read():
    """Too few GPUs is said before the model is resolved (an alias would be fetched first)."""
    with pytest.raises(ConfigError, match=r"PONDER_TENSOR_PARALLEL_SIZE=64.*(no CUDA device|but torch sees)"):
        check_worker_devices("no-such-model", EngineConfig(device="cuda", tensor_parallel_size=64))
