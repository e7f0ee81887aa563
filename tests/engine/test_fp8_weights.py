"""FP8 keep mode (EngineConfig.fp8_weights): an FP8 checkpoint's linears run on their FP8 weights and
block scales through kernels.fp8_linear (the CPU reference here, which quantises activations per
token per 128 channels, so logits differ slightly from the dequantised engine's)."""

from __future__ import annotations

import pytest
import torch

from ponder.engine import SamplingParams
from ponder.engine.errors import ConfigError
from ponder.engine.runtime.fp8 import FP8_DTYPE, dequantize_block_fp8
from tests.engine.test_against_transformers import engine_prompt_logits, prompts_for

MODEL = "tiny-r1-fp8"


def _params(llm) -> dict[str, torch.Tensor]:
    return dict(llm.engine.model_runner.model.named_parameters())


def _linear_bytes(params: dict[str, torch.Tensor]) -> int:
    """Bytes of the checkpoint's quantised linears (weights and scales): attention, MLPs, experts."""
    skip = ("embed_tokens", "lm_head", "norm", "mlp.gate.")
    return sum(p.numel() * p.element_size() for n, p in params.items() if not any(s in n for s in skip))


def test_keep_mode_holds_fp8_parameters(make_llm):
    keep, dequantized = _params(make_llm(MODEL, fp8_weights="keep")), _params(make_llm(MODEL))
    attn = "model.layers.1.self_attn."
    # q_lora 96 is not a whole 128-row block: q_a and kv_a stay two FP8 linears.
    assert keep[attn + "q_a_proj.weight"].dtype == FP8_DTYPE and keep[attn + "q_a_proj.weight"].shape == (96, 256)
    assert keep[attn + "kv_a_proj_with_mqa.weight_scale_inv"].shape == (1, 2)
    assert keep[attn + "kv_b_proj.weight"].dtype == FP8_DTYPE
    # gate|up of 512 rows each packs; its scales are [8, 2].
    assert keep["model.layers.0.mlp.gate_up_proj.weight"].dtype == FP8_DTYPE
    assert keep["model.layers.0.mlp.gate_up_proj.weight_scale_inv"].shape == (8, 2)
    experts = "model.layers.1.mlp.experts."
    assert keep[experts + "w13"].dtype == FP8_DTYPE and keep[experts + "w13_scale_inv"].shape == (16, 2, 2)
    assert keep[experts + "w2"].dtype == FP8_DTYPE and keep[experts + "w2_scale_inv"].dtype == torch.float32
    assert keep["model.layers.1.mlp.shared_experts.down_proj.weight"].dtype == FP8_DTYPE
    # Embeddings, norms, router and head keep the engine dtype.
    for name in (
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.layers.1.mlp.gate.weight",
        attn + "kv_a_layernorm.weight",
    ):
        assert keep[name].dtype == torch.float32
    assert _linear_bytes(keep) * 3 < _linear_bytes(dequantized)  # fp8 vs fp32: ~1/4 plus the scales


def test_keep_mode_wiring_is_exact(make_llm, monkeypatch):
    """With an fp8_linear that dequantises the weight (no activation quantisation) the FP8 model
    is the dequantised model: every FP8 parameter and scale is where the layers read it."""
    from ponder import kernels
    from ponder.kernels import reference

    def dequantizing_linear(x, weight, scale, bias=None, out_dtype=None):
        return torch.nn.functional.linear(x, dequantize_block_fp8(weight, scale, 128, x.dtype), bias)

    keep, dequantized = make_llm(MODEL, fp8_weights="keep"), make_llm(MODEL, fp8_weights="dequantize")
    monkeypatch.setattr(kernels, "fp8_linear", dequantizing_linear)
    monkeypatch.setattr(reference, "fp8_linear", dequantizing_linear)
    for prompt in prompts_for(MODEL, lengths=(5, 40)):
        ours, reference_logits = engine_prompt_logits(keep, prompt), engine_prompt_logits(dequantized, prompt)
        torch.testing.assert_close(ours, reference_logits, rtol=1e-4, atol=1e-4)


def test_keep_mode_logits_near_dequantized(make_llm):
    """The real FP8 path also quantises activations (per token, 128 channels): on this random model
    (whose routing flips with small perturbations) logits stay correlated, not equal."""
    keep, dequantized = make_llm(MODEL, fp8_weights="keep"), make_llm(MODEL, fp8_weights="dequantize")
    for prompt in prompts_for(MODEL, lengths=(5, 40)):
        ours, reference_logits = engine_prompt_logits(keep, prompt), engine_prompt_logits(dequantized, prompt)
        cosine = torch.nn.functional.cosine_similarity(ours, reference_logits, dim=-1)
        assert cosine.mean() > 0.9 and cosine.min() > 0.5


def test_keep_mode_generates(make_llm):
    llm = make_llm(MODEL, fp8_weights="keep")
    prompt = prompts_for(MODEL, lengths=(12,))[0]
    [out] = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    assert len(out.token_ids) == 16 and out.finish_reason == "length"


def test_auto_dequantizes_on_cpu(make_llm):
    params = _params(make_llm(MODEL))  # fp8_weights="auto"
    assert all(p.dtype != FP8_DTYPE for p in params.values())
    assert "model.layers.1.self_attn.fused_qkv_a_proj.weight" in params


def test_bad_fp8_weights_value():
    from ponder.engine.config import EngineConfig

    with pytest.raises(ConfigError, match="fp8_weights"):
        EngineConfig(fp8_weights="fp8")
