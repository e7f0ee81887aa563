"""FP8 block-scaled GEMM (ponder/kernels/triton_kernels/fp8_gemm.py) against ponder/kernels/reference.py.

Without a GPU these run in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on CPU
tensors, at small shapes. Tolerances:
- activation quantisation: bit-exact (same fp8 bytes, same fp32 scales) — both sides divide by
  the same fp32 scale and round to nearest even.
- GEMM vs the reference on the SAME quantised operands: 1e-3 relative to the output's max (fp32
  sums in a different order; bf16 outputs: 1e-2, one bf16 rounding).
- GEMM vs the unquantised fp32 matmul: 5e-2 relative Frobenius error (e4m3 keeps 3 mantissa
  bits on both operands: ~3.5-4% on random inputs).
"""

from __future__ import annotations

import pytest
import torch

from ponder.engine.runtime.fp8 import quantize_block_fp8
from ponder.kernels import reference
from tests.kernels.poison import poisoned_allocations

fp8_gemm = pytest.importorskip("ponder.kernels.triton_kernels.fp8_gemm")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _close(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    assert actual.shape == expected.shape
    assert torch.isfinite(actual).all(), "unwritten (NaN-poisoned) or non-finite outputs"
    bound = rel * max(expected.abs().max().item(), 1e-6)
    err = (actual.float() - expected.float()).abs().max().item()
    assert err <= bound, f"max abs error {err:.3e} > {bound:.3e}"


@pytest.mark.parametrize(
    ("tokens", "k", "dtype"),
    [
        (1, 128, torch.float32),
        (5, 300, torch.float32),
        (7, 257, torch.bfloat16),
        (3, 64, torch.float16),
        (0, 256, torch.float32),
    ],
)
def test_quant_matches_reference_bit_exact(tokens, k, dtype):
    gen = torch.Generator().manual_seed(tokens * 1000 + k)
    x = (torch.randn(tokens, k, generator=gen) * 4).to(dtype).to(DEVICE)
    with poisoned_allocations():
        q, scales = fp8_gemm.per_token_group_quant_fp8(x)
    ref_q, ref_scales = reference.per_token_group_quant_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (tokens, k)
    assert scales.dtype == torch.float32 and scales.shape == (tokens, -(-k // 128))
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scales, ref_scales)


def test_quant_rounding_edge_cases():
    """Wide dynamic range in a group (subnormal fp8 results), values that round up across a power
    of two (the interpreter's own cast gets those wrong), an all-zero group and the amax itself."""
    x = torch.zeros(2, 256)
    x[0, :128] = torch.logspace(-6, 2, 128)  # 1e-6 .. 100 in one group: the small ones go subnormal
    x[0, 1::2] *= -1
    x[0, 128] = 448.0  # scale 1: the rest are quantised as they are
    x[0, 129:133] = torch.tensor([126.3, -31.6, 0.4995, 15.99])  # round up to 128, -32, 0.5, 16
    x[0, 133:137] = torch.tensor([17.0, 19.0, 0.0009765625 * 1.5, 0.0029296875])  # ties to even
    # row 1: group 0 all zeros, group 1 one large value
    x[1, 5] = -0.0  # keeps its sign bit
    x[1, 200] = -3.0e4
    x = x.to(DEVICE)
    q, scales = fp8_gemm.per_token_group_quant_fp8(x)
    ref_q, ref_scales = reference.per_token_group_quant_fp8(x)
    assert torch.equal(q.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scales, ref_scales)
    assert (q[1, :128].float() == 0).all()
    assert q[1, 200].float().item() == -448.0
    assert torch.equal(q[0, 129:133].float().cpu(), torch.tensor([128.0, -32.0, 0.5, 16.0]))


@pytest.mark.parametrize(
    ("tokens", "n", "k"),
    [
        (1, 128, 128),  # a single token, one block
        (1, 200, 384),  # ragged N, several K blocks
        (5, 256, 300),  # ragged K
        (17, 130, 257),  # ragged everything, T across the 16-row tile
        (70, 96, 128),  # T across the 64-row tile, N below one block
    ],
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gemm_matches_reference(tokens, n, k, out_dtype):
    gen = torch.Generator().manual_seed(tokens * 7919 + n * 31 + k)
    x = torch.randn(tokens, k, generator=gen) * 2
    w = torch.randn(n, k, generator=gen) * 0.05
    w_q, w_scale = quantize_block_fp8(w)
    x, w_q, w_scale = x.to(DEVICE), w_q.to(DEVICE), w_scale.to(DEVICE)
    with poisoned_allocations():
        x_q, x_scale = fp8_gemm.per_token_group_quant_fp8(x)
        out = fp8_gemm.fp8_block_gemm(x_q, x_scale, w_q, w_scale, out_dtype)
    assert out.dtype == out_dtype and out.shape == (tokens, n)
    # the same quantised operands: only summation order (and the output rounding) differ
    expected = reference.fp8_block_gemm(x_q, x_scale, w_q, w_scale, torch.float32)
    _close(out, expected, 1e-3 if out_dtype == torch.float32 else 1e-2)
    # the unquantised product: fp8 rounding of both operands
    full = x.float() @ w.to(DEVICE).t()
    rel = ((out.float() - full).norm() / full.norm()).item()
    assert rel < 5e-2, f"relative error {rel:.3e} vs the fp32 matmul"


def test_empty_batch_launches_nothing(monkeypatch):
    w_q, w_scale = quantize_block_fp8(torch.randn(64, 256))
    x = torch.empty(0, 256, device=DEVICE)

    def no_launch(*args, **kwargs):
        raise AssertionError("launched a kernel on an empty batch")

    monkeypatch.setattr(fp8_gemm, "_fp8_block_gemm_kernel", no_launch)
    monkeypatch.setattr(fp8_gemm, "_per_token_group_quant_kernel", no_launch)
    out = fp8_gemm.fp8_linear(x, w_q.to(DEVICE), w_scale.to(DEVICE))
    assert out.shape == (0, 64) and out.dtype == x.dtype


def test_fp8_linear_batched_input_bias_and_dispatch():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 200, generator=gen).to(torch.bfloat16)
    w_q, w_scale = quantize_block_fp8(torch.randn(72, 200, generator=gen) * 0.1)
    bias = torch.randn(72, generator=gen)
    x, w_q, w_scale, bias = (t.to(DEVICE) for t in (x, w_q, w_scale, bias))
    out = fp8_gemm.fp8_linear(x, w_q, w_scale, bias, out_dtype=torch.float32)
    expected = reference.fp8_linear(x, w_q, w_scale, bias, out_dtype=torch.float32)
    assert out.shape == (2, 3, 72)
    _close(out, expected, 1e-3)
    from ponder import kernels

    dispatched = kernels.fp8_linear(x, w_q, w_scale, bias)  # Triton on CUDA, the reference on CPU
    assert dispatched.dtype == torch.bfloat16 and dispatched.shape == (2, 3, 72)
    _close(dispatched, expected, 1e-2)


@pytest.mark.parametrize(
    "bad",
    ["weight_dtype", "scale_shape", "k_mismatch", "x_scale_shape"],
)
def test_launcher_rejects_bad_inputs(bad):
    w_q, w_scale = quantize_block_fp8(torch.randn(130, 256))
    x_q, x_scale = reference.per_token_group_quant_fp8(torch.randn(4, 256))
    if bad == "weight_dtype":
        w_q = w_q.float()
    elif bad == "scale_shape":
        w_scale = w_scale[:1]
    elif bad == "k_mismatch":
        w_q = w_q[:, :128].contiguous()
        w_scale = w_scale[:, :1].contiguous()
    elif bad == "x_scale_shape":
        x_scale = x_scale[:, :1].contiguous()
    with pytest.raises(AssertionError):
        fp8_gemm.fp8_block_gemm(x_q, x_scale, w_q, w_scale)
