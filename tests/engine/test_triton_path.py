"""The engine on its GPU path: every hot op through the Triton kernels, checked end to end against
transformers. Without a GPU, the CPU tensors go through Triton's interpreter (kernels.TRITON_ON_CPU);
with one, the same test runs the engine on CUDA.

tiny-llama covers the paged GQA store, decode and prefill kernels; tiny-r1 the latent store, the
absorbed MLA decode and prefill (over a cached prefix: chunks and prefix hits), the noaux_tc router
and the fused MoE. The scenario mixes decodes and prefill chunks in one step, and hits the prefix
cache.

tiny-r1-fp8 with its FP8 weights kept runs the FP8 GEMM and the FP8 fused MoE. Its tokens are not
compared with transformers: activation quantisation has no transformers counterpart on CPU, and on
this random model a 1e-6 change (another summation order) can flip an expert choice, which then
moves every later position. Instead every FP8 call the engine makes is checked against the
reference on the very same inputs (the engine's real shapes and strides)."""

from __future__ import annotations

import os

import pytest
import torch

from ponder import kernels
from ponder.engine import SamplingParams
from ponder.engine.runtime import LLM
from tests.conftest import TEST_KV_CACHE_BYTES
from tests.engine.test_against_transformers import hf_greedy, prompts_for

NEW_TOKENS = 6
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
CUDA = torch.cuda.is_available()


@pytest.fixture
def triton_path(monkeypatch) -> str:
    """The device whose tensors take the Triton kernels."""
    if CUDA:
        return "cuda"
    assert os.environ.get("TRITON_INTERPRET") == "1", "tests/conftest.py sets the interpreter without CUDA"
    monkeypatch.setattr(kernels, "TRITON_ON_CPU", True)
    return "cpu"


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-r1"])
def test_engine_on_the_triton_kernels_matches_transformers(model, triton_path, hf_model):
    llm = LLM(
        model,
        device=triton_path,
        enable_prefix_caching=True,
        max_num_batched_tokens=24,  # prompts go in chunks, beside the other sequences' decodes
        kv_cache_memory=TEST_KV_CACHE_BYTES,
    )
    shared, *tails = prompts_for(model, lengths=(32, 5, 19, 3), seed=11)
    first = [shared + tails[0], tails[1] + shared]
    second = shared + tails[2]  # its first 32 tokens (two blocks of 16) are cached by then
    outs = llm.generate(first, GREEDY) + llm.generate(second, GREEDY)
    assert outs[-1].usage.cached_tokens == 32
    reference = hf_model(model)
    assert [o.token_ids for o in outs] == [hf_greedy(reference, p, NEW_TOKENS) for p in [*first, second]]


def test_fp8_ops_on_the_engine_inputs_match_the_references(triton_path, monkeypatch):
    from ponder.kernels import reference

    errors: dict[str, list[float]] = {"fp8_linear": [], "fused_moe_fp8": []}

    def checked(name: str, expected_fn):
        ours_fn = getattr(kernels, name)

        def call(*args):
            ours, expected = ours_fn(*args), expected_fn(*args)
            errors[name].append(((ours - expected).abs().max() / expected.abs().max().clamp_min(1e-6)).item())
            return ours

        monkeypatch.setattr(kernels, name, call)

    checked("fp8_linear", reference.fp8_linear)
    checked("fused_moe_fp8", lambda *args: reference.fused_moe_fp8(*args, reference.fp8_linear))
    llm = LLM(
        "tiny-r1-fp8",
        device=triton_path,
        fp8_weights="keep",
        enable_prefix_caching=True,
        max_num_batched_tokens=24,
        kv_cache_memory=TEST_KV_CACHE_BYTES,
    )
    # a prompt in chunks beside the other's decodes: every shape the engine gives the FP8 ops
    long, short = prompts_for("tiny-r1-fp8", lengths=(30, 5), seed=11)
    llm.generate([long, short], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    assert len(errors["fp8_linear"]) > 50 and len(errors["fused_moe_fp8"]) > 5
    # fp32 sums in another order: 1e-4 of the output's max (bf16 outputs on a GPU: 1e-2)
    tolerance = 1e-2 if triton_path == "cuda" else 1e-4
    assert max(errors["fp8_linear"]) <= tolerance and max(errors["fused_moe_fp8"]) <= tolerance, errors
