"""FP8 block-scaled GEMM (DeepSeek-V3/R1 checkpoints; docs/architecture.md#fp8-weights and #kernels).

y[T, N] = x[T, K] @ W^T with W float8_e4m3fn [N, K] and `weight_scale_inv` fp32 [ceil(N/128), ceil(K/128)]
(W = fp8 * scale per 128x128 block). The activations are quantised first, per token per 128 channels
(`per_token_group_quant_fp8`: fp8 x and fp32 scales [T, ceil(K/128)]); the GEMM then walks K one
128-wide block at a time, multiplies the fp8 tiles into an fp32 partial sum and adds it to the
accumulator scaled by both blocks' scales. N, K and T need not be multiples of anything: edge tiles
are masked (a masked fp8 load reads 0, which adds nothing).

Interpreter notes (TRITON_INTERPRET=1, triton 3.9): its fp32 -> fp8 cast gets values that round up
across a power of two wrong (126.3 -> 64), so the quant kernel rounds to the e4m3 grid itself (round
to nearest even, the same as the hardware cast) and the cast then only sees representable values;
and the fp8 tiles are upcast to fp32 before `tl.dot` there (no fp8 dot in numpy).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP = 128  # activation group = weight block = the GEMM's K step
QUANT_EPS = 1e-10  # floor of a group's amax: an all-zero group gets a tiny scale and quantises to 0

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _round_to_e4m3(v):
    """v (fp32, |v| <= 448) rounded to the nearest float8 e4m3 value, ties to even."""
    bits = v.to(tl.int32, bitcast=True)
    exponent = ((bits >> 23) & 0xFF) - 127
    exponent = tl.maximum(exponent, -6)  # below 2^-6 e4m3 is subnormal: fixed spacing 2^-9
    spacing = ((exponent - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    steps = tl.abs(v) / spacing  # exact: a power of two
    # (s + 1.5 * 2^23) - 1.5 * 2^23 rounds 0 <= s < 2^22 to an integer, ties to even, in fp32.
    rounded = ((steps + 12582912.0) - 12582912.0) * spacing
    return tl.where(bits < 0, -rounded, rounded)  # the sign bit, so -0.0 and tiny negatives keep theirs


@triton.jit
def _per_token_group_quant_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    K,
    stride_xt,
    stride_qt,
    stride_st,
    GROUP_SIZE: tl.constexpr,
    EPS: tl.constexpr,
    MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    cols = group * GROUP_SIZE + tl.arange(0, GROUP_SIZE)
    mask = cols < K
    x = tl.load(x_ptr + token * stride_xt + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.maximum(tl.max(tl.abs(x), axis=0), EPS) / MAX
    q = tl.clamp(x / scale, -MAX, MAX)
    q = _round_to_e4m3(q)
    tl.store(q_ptr + token * stride_qt + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + token * stride_st + group, scale)


def per_token_group_quant_fp8(x: torch.Tensor, group_size: int = GROUP) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (fp32/fp16/bf16) -> (fp8 [T, K], fp32 scales [T, ceil(K/group)]); x = q * scale."""
    assert x.dim() == 2, f"x must be [T, K], got {tuple(x.shape)}"
    assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}"
    assert group_size == GROUP, "the GEMM's K step is 128: groups must be 128 wide"
    if x.stride(-1) != 1:
        x = x.contiguous()
    num_tokens, k = x.shape
    groups = triton.cdiv(k, group_size)
    q = torch.empty((num_tokens, k), dtype=FP8_DTYPE, device=x.device)
    scales = torch.empty((num_tokens, groups), dtype=torch.float32, device=x.device)
    if num_tokens == 0 or k == 0:
        return q, scales
    _per_token_group_quant_kernel[(num_tokens, groups)](
        x, q, scales, k, x.stride(0), q.stride(0), scales.stride(0),
        GROUP_SIZE=group_size, EPS=QUANT_EPS, MAX=FP8_MAX,
    )  # fmt: skip
    return q, scales


@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr,  # [T, K] fp8
    a_scale_ptr,  # [T, ceil(K/128)] fp32
    b_ptr,  # [N, K] fp8
    b_scale_ptr,  # [ceil(N/128), ceil(K/128)] fp32
    c_ptr,  # [T, N]
    T,
    N,
    K,
    stride_at,
    stride_ast,
    stride_bn,
    stride_bsn,
    stride_ct,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_BLOCK: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BM] tokens
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] output features
    row_mask = rows < T
    col_mask = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows64[:, None] * stride_at + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + cols64[None, :] * stride_bn + offs_k[:, None]  # [BK, BN]: W^T tile
    a_scale_ptrs = a_scale_ptr + rows64 * stride_ast  # [BM]
    b_scale_ptrs = b_scale_ptr + (cols64 // SCALE_BLOCK) * stride_bsn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        a_scale = tl.load(a_scale_ptrs + kb, mask=row_mask, other=0.0)  # [BM]
        b_scale = tl.load(b_scale_ptrs + kb, mask=col_mask, other=0.0)  # [BN]
        if UPCAST:
            partial = tl.dot(a.to(tl.float32), b.to(tl.float32))
        else:
            partial = tl.dot(a, b)  # fp8 x fp8 -> fp32
        acc += partial * a_scale[:, None] * b_scale[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + rows64[:, None] * stride_ct + cols64[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def native_fp8_dot(device: torch.device) -> bool:
    """fp8 tensor-core dots need sm89+ (Ada, Hopper); elsewhere (and in the interpreter) upcast."""
    if _INTERPRET or device.type != "cuda":
        return False
    return _has_fp8_tensor_cores(torch.cuda.current_device() if device.index is None else device.index)


@functools.cache
def _has_fp8_tensor_cores(device_index: int) -> bool:  # asked once per device, not per GEMM
    return torch.cuda.get_device_capability(device_index) >= (8, 9)


def _tile_config(num_tokens: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages). Decode-sized T is weight-bandwidth bound: narrow
    N tiles give more CTAs to stream the weight; large T is compute bound: big tiles."""
    if num_tokens <= 16:
        return 16, 64, 4, 4
    if num_tokens <= 64:
        return 64, 64, 4, 4
    if num_tokens <= 256 or n <= 2048:
        return 64, 128, 4, 3
    return 128, 128, 8, 3


def fp8_block_gemm(
    x_q: torch.Tensor,  # [T, K] float8_e4m3fn
    x_scale: torch.Tensor,  # [T, ceil(K/128)] fp32
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:  # [T, N]
    """The GEMM on already quantised activations (see `fp8_linear` for the whole op)."""
    assert x_q.dim() == 2 and weight.dim() == 2, "x_q [T, K] and weight [N, K]"
    assert x_q.dtype == FP8_DTYPE and weight.dtype == FP8_DTYPE, f"fp8 operands, got {x_q.dtype}, {weight.dtype}"
    num_tokens, k = x_q.shape
    n = weight.shape[0]
    groups = triton.cdiv(k, GROUP)
    assert weight.shape[1] == k, f"x has K={k}, weight {tuple(weight.shape)}"
    assert tuple(x_scale.shape) == (num_tokens, groups), f"x_scale {tuple(x_scale.shape)} != {(num_tokens, groups)}"
    assert tuple(weight_scale_inv.shape) == (triton.cdiv(n, GROUP), groups), (
        f"weight_scale_inv {tuple(weight_scale_inv.shape)} does not fit weight {tuple(weight.shape)} in 128x128 blocks"
    )
    assert x_scale.dtype == torch.float32 and weight_scale_inv.dtype == torch.float32, "fp32 scales"
    assert out_dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported out_dtype {out_dtype}"
    assert x_q.stride(-1) == 1 and weight.stride(-1) == 1, "K must be the contiguous dim"
    assert x_scale.stride(-1) == 1 and weight_scale_inv.stride(-1) == 1, "scales must be row-major"
    devices = {t.device for t in (x_q, x_scale, weight, weight_scale_inv)}
    assert len(devices) == 1, f"all operands on one device, got {devices}"
    out = torch.empty((num_tokens, n), dtype=out_dtype, device=x_q.device)
    if num_tokens == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    block_m, block_n, num_warps, num_stages = _tile_config(num_tokens, n)
    grid = (triton.cdiv(num_tokens, block_m), triton.cdiv(n, block_n))
    _fp8_block_gemm_kernel[grid](
        x_q, x_scale, weight, weight_scale_inv, out,
        num_tokens, n, k,
        x_q.stride(0), x_scale.stride(0), weight.stride(0), weight_scale_inv.stride(0), out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=GROUP, SCALE_BLOCK=GROUP,
        UPCAST=not native_fp8_dot(x_q.device),
        num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    return out


def fp8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    bias: torch.Tensor | None = None,  # [N]
    out_dtype: torch.dtype | None = None,  # default: x's dtype
) -> torch.Tensor:  # [..., N]
    """y = x W^T (+ b): activations quantised per token per 128 channels, then the block-scaled GEMM."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, x.shape[-1])
    x_q, x_scale = per_token_group_quant_fp8(x2)
    out = fp8_block_gemm(x_q, x_scale, weight, weight_scale_inv, out_dtype or x.dtype)
    if bias is not None:
        out += bias.to(out.dtype)
    return out.view(*lead, weight.shape[0])
