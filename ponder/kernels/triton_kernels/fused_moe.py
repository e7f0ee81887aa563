"""Fused MoE: the routed experts as two grouped GEMMs over (token, choice) pairs sorted by expert,
with bf16/fp16/fp32 experts or DeepSeek's block-scaled FP8 ones.

1. Alignment (`align_pairs`, torch ops, no host sync): the T*k pairs are sorted by expert and each
   expert's segment is padded to a multiple of BLOCK_M, so every row tile belongs to one expert
   (vLLM's `moe_align_block_size`). Padding rows hold the sentinel T*k and are never stored.
2. `_gate_up_kernel`: per row tile, x[token] @ w13[expert]^T for the gate and up halves at once,
   SiLU(gate) * up fused, written per pair -> hidden [T*k, I].
3. `_down_kernel`: hidden @ w2[expert]^T times the pair's top-k weight -> [T*k, E] in fp32.
4. The top-k combine: the k rows of each token summed.

Expert parallelism (`expert_map`, vLLM's): w13/w2 hold this rank's experts only and the router's
global ids map to local ones, -1 for another rank's expert. Those pairs sort into one segment past
the last local expert whose tiles are marked -1 (skipped like padding) and their rows of the
[P, E] output stay zero, so the combine is this rank's partial sum.

FP8 experts (float8_e4m3fn weights with fp32 scales per 128x128 block, R1's checkpoint format):
the activations are quantised per token per 128 channels before each GEMM (x, then the hidden
state), the K loop steps 128 channels at a time, and each fp8 tile product is scaled by the token
group's and the weight block's scales before it is added (the FP8 GEMM's scheme, fp8_gemm.py).

Dimension legend: T tokens, E hidden size, X experts, I expert width, k choices per token,
P = T*k pairs, R padded rows (an upper bound, so that no size needs the host), BM rows per tile.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ponder.kernels.triton_kernels.fp8_gemm import FP8_DTYPE, GROUP, native_fp8_dot, per_token_group_quant_fp8

# Under the interpreter tl.dot on bf16 operands is wrong (triton 3.9): upcast there, not on a GPU.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def align_pairs(
    topk_ids: torch.Tensor, num_experts: int, block_m: int, expert_map: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """[T, k] expert ids -> sorted pair ids [R] (sentinel P in padding), expert of each tile [R/BM]
    (-1 past the last used tile). With `expert_map` ([X_global] -> local id or -1) the ids are
    global; unmapped pairs go to a segment X past the local experts, whose tiles are -1 too (it
    fits in R: only the local segments are padded before it)."""
    flat = topk_ids.flatten()  # [P]
    pairs = flat.numel()
    if expert_map is not None:
        flat = expert_map[flat]
        flat = torch.where(flat < 0, num_experts, flat)  # [P] in 0..X
    counts = torch.bincount(flat, minlength=num_experts)  # [X], or [X + 1] with skipped pairs
    padded_ends = torch.cumsum((counts + block_m - 1) // block_m * block_m, 0)  # [X]
    padded_starts = padded_ends - (counts + block_m - 1) // block_m * block_m  # [X]
    starts = torch.cumsum(counts, 0) - counts  # [X]
    order = flat.argsort(stable=True)  # [P] pair ids grouped by expert
    experts = flat[order]  # [P]
    dest = padded_starts[experts] + torch.arange(pairs, device=flat.device) - starts[experts]  # [P]
    rows = pairs + min(num_experts, pairs) * (block_m - 1)  # R: each used expert pads < BM rows
    rows = (rows + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((rows,), pairs, dtype=torch.int64, device=flat.device)  # [R]
    sorted_ids[dest] = order
    tile_rows = torch.arange(0, rows, block_m, device=flat.device)  # [R/BM] first row of each tile
    tile_experts = torch.searchsorted(padded_ends, tile_rows, right=True)  # [R/BM]
    tile_experts = torch.where(tile_experts < num_experts, tile_experts, -1)
    return sorted_ids, tile_experts


@triton.jit
def _dot(acc, a, w, a_scale, w_scale, FP8: tl.constexpr, UPCAST: tl.constexpr):
    """acc + a @ w ([BM, BK] x [BK, BN]); FP8: the product scaled by its rows' and columns' block scales."""
    if UPCAST:
        a = a.to(tl.float32)
        w = w.to(tl.float32)
    if FP8:
        acc += tl.dot(a, w) * a_scale[:, None] * w_scale[None, :]
    else:
        acc = tl.dot(a, w, acc)
    return acc


@triton.jit
def _gate_up_kernel(
    x_ptr,  # [T, E] (fp8 in FP8 mode)
    x_scale_ptr,  # [T, ceil(E/128)] fp32, FP8 mode only
    w13_ptr,  # [X, 2I, E]
    w13_scale_ptr,  # [X, 2*ceil(I/128), ceil(E/128)] fp32 (gate's block rows, then up's), FP8 only
    hidden_ptr,  # [P, I]
    sorted_ids_ptr,  # [R]
    tile_experts_ptr,  # [R/BM]
    num_pairs,
    stride_xt,
    stride_xst,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_ht,
    TOP_K: tl.constexpr,
    HIDDEN: tl.constexpr,  # E
    WIDTH: tl.constexpr,  # I
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,  # 128 in FP8 mode: one scale block per step
    FP8: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    pair_ok = pairs < num_pairs
    tokens = pairs // TOP_K
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] among the I outputs
    col_ok = cols < WIDTH
    inner = tl.arange(0, BLOCK_K)  # [BK]
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + inner[None, :]  # [BM, BK]
    gate_ptrs = w13_ptr + expert * stride_we + cols[None, :] * stride_wn + inner[:, None]  # [BK, BN]
    up_ptrs = gate_ptrs + WIDTH * stride_wn
    x_scale_ptrs = x_scale_ptr + tokens * stride_xst  # [BM]
    gate_scale_ptrs = w13_scale_ptr + expert * stride_wse + (cols // BLOCK_K) * stride_wsn  # [BN]
    up_scale_ptrs = gate_scale_ptrs + tl.cdiv(WIDTH, BLOCK_K) * stride_wsn
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(HIDDEN, BLOCK_K)):
        k_ok = inner < HIDDEN - kb * BLOCK_K
        a = tl.load(x_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        w_gate = tl.load(gate_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        w_up = tl.load(up_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale, gate_scale, up_scale = 1.0, 1.0, 1.0
        if FP8:
            a_scale = tl.load(x_scale_ptrs + kb, mask=pair_ok, other=0.0)  # [BM]
            gate_scale = tl.load(gate_scale_ptrs + kb, mask=col_ok, other=0.0)  # [BN]
            up_scale = tl.load(up_scale_ptrs + kb, mask=col_ok, other=0.0)
        gate = _dot(gate, a, w_gate, a_scale, gate_scale, FP8, UPCAST)
        up = _dot(up, a, w_up, a_scale, up_scale, FP8, UPCAST)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    out = gate / (1.0 + tl.exp(-gate)) * up  # SiLU(gate) * up, [BM, BN]
    h_ptrs = hidden_ptr + pairs[:, None] * stride_ht + cols[None, :]
    tl.store(h_ptrs, out.to(hidden_ptr.dtype.element_ty), mask=pair_ok[:, None] & col_ok[None, :])


@triton.jit
def _down_kernel(
    hidden_ptr,  # [P, I] (fp8 in FP8 mode)
    hidden_scale_ptr,  # [P, ceil(I/128)] fp32, FP8 mode only
    w2_ptr,  # [X, E, I]
    w2_scale_ptr,  # [X, ceil(E/128), ceil(I/128)] fp32, FP8 mode only
    weights_ptr,  # [P] top-k weights
    out_ptr,  # [P, E] fp32
    sorted_ids_ptr,  # [R]
    tile_experts_ptr,  # [R/BM]
    num_pairs,
    stride_ht,
    stride_hst,
    stride_we,
    stride_wn,
    stride_wse,
    stride_wsn,
    stride_ot,
    HIDDEN: tl.constexpr,  # E
    WIDTH: tl.constexpr,  # I
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    FP8: tl.constexpr,
    UPCAST: tl.constexpr,
):
    tile = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_ids_ptr + tile * BLOCK_M + tl.arange(0, BLOCK_M))  # [BM]
    pair_ok = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] among the E outputs
    col_ok = cols < HIDDEN
    inner = tl.arange(0, BLOCK_K)  # [BK]
    h_ptrs = hidden_ptr + pairs[:, None] * stride_ht + inner[None, :]  # [BM, BK]
    w_ptrs = w2_ptr + expert * stride_we + cols[None, :] * stride_wn + inner[:, None]  # [BK, BN]
    h_scale_ptrs = hidden_scale_ptr + pairs * stride_hst  # [BM]
    w_scale_ptrs = w2_scale_ptr + expert * stride_wse + (cols // BLOCK_K) * stride_wsn  # [BN]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for kb in range(0, tl.cdiv(WIDTH, BLOCK_K)):
        k_ok = inner < WIDTH - kb * BLOCK_K
        a = tl.load(h_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_scale, w_scale = 1.0, 1.0
        if FP8:
            a_scale = tl.load(h_scale_ptrs + kb, mask=pair_ok, other=0.0)  # [BM]
            w_scale = tl.load(w_scale_ptrs + kb, mask=col_ok, other=0.0)  # [BN]
        acc = _dot(acc, a, w, a_scale, w_scale, FP8, UPCAST)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    weight = tl.load(weights_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)  # [BM]
    o_ptrs = out_ptr + pairs[:, None] * stride_ot + cols[None, :]
    tl.store(o_ptrs, acc * weight[:, None], mask=pair_ok[:, None] & col_ok[None, :])


def _check_fp8_scales(w13, w2, w13_scale_inv, w2_scale_inv) -> None:
    num_experts, hidden, width = w2.shape
    assert w13.dtype == w2.dtype == FP8_DTYPE, f"FP8 experts are float8_e4m3fn, got {w13.dtype}, {w2.dtype}"
    hidden_blocks, width_blocks = triton.cdiv(hidden, GROUP), triton.cdiv(width, GROUP)
    assert w13_scale_inv.shape == (num_experts, 2 * width_blocks, hidden_blocks), (
        f"w13_scale_inv {tuple(w13_scale_inv.shape)} != {(num_experts, 2 * width_blocks, hidden_blocks)}"
    )
    assert w2_scale_inv.shape == (num_experts, hidden_blocks, width_blocks), (
        f"w2_scale_inv {tuple(w2_scale_inv.shape)} != {(num_experts, hidden_blocks, width_blocks)}"
    )
    assert w13_scale_inv.dtype == w2_scale_inv.dtype == torch.float32, "fp32 block scales"
    assert w13_scale_inv.stride(-1) == 1 and w2_scale_inv.stride(-1) == 1, "row-major scales"


def fused_moe(
    x: torch.Tensor,  # [T, E] hidden states
    w13: torch.Tensor,  # [X, 2I, E] gate|up of every expert
    w2: torch.Tensor,  # [X, E, I] down of every expert
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    w13_scale_inv: torch.Tensor | None = None,  # [X, 2*ceil(I/128), ceil(E/128)]: FP8 experts
    w2_scale_inv: torch.Tensor | None = None,  # [X, ceil(E/128), ceil(I/128)]
    expert_map: torch.Tensor | None = None,  # [X_global] global id -> local id, -1 = another rank's
) -> torch.Tensor:  # [T, E] = sum_k weight_k * expert_k(x) over the local experts
    num_tokens, hidden = x.shape
    num_experts, width = w2.shape[0], w2.shape[2]
    top_k = topk_ids.shape[1]
    fp8 = w13_scale_inv is not None
    assert fp8 == (w2_scale_inv is not None), "FP8 experts need both block scales"
    assert w13.shape == (num_experts, 2 * width, hidden) and w2.shape == (num_experts, hidden, width)
    assert topk_weights.shape == topk_ids.shape == (num_tokens, top_k)
    if fp8:
        _check_fp8_scales(w13, w2, w13_scale_inv, w2_scale_inv)
        assert x.dtype in (torch.float32, torch.float16, torch.bfloat16), f"unsupported dtype {x.dtype}"
    else:
        assert x.dtype == w13.dtype == w2.dtype, (x.dtype, w13.dtype, w2.dtype)
    assert x.stride(-1) == 1 and w13.stride(-1) == 1 and w2.stride(-1) == 1
    assert not topk_ids.is_floating_point()
    if num_tokens == 0:
        return torch.empty_like(x)
    pairs = num_tokens * top_k
    block_m = 64 if pairs >= 1024 else 16  # decode batches: small tiles, less padding
    block_n, block_k = 64, GROUP if fp8 else 64
    upcast = _INTERPRET or (fp8 and not native_fp8_dot(x.device))
    sorted_ids, tile_experts = align_pairs(topk_ids, num_experts, block_m, expert_map)  # [R], [R/BM]
    hidden_states = torch.empty(pairs, width, dtype=x.dtype, device=x.device)  # [P, I]
    weighted = torch.empty(pairs, hidden, dtype=torch.float32, device=x.device)  # [P, E]
    if expert_map is not None:
        weighted.zero_()  # another rank's pairs: rows never written, so they must add zero
    x_in, x_scale = per_token_group_quant_fp8(x) if fp8 else (x, x)  # (x, x): the scale pointer is unread
    w13_scale = w13_scale_inv if w13_scale_inv is not None else w13  # i.e. if fp8
    _gate_up_kernel[(tile_experts.numel(), triton.cdiv(width, block_n))](
        x_in, x_scale, w13, w13_scale, hidden_states, sorted_ids, tile_experts, pairs,
        x_in.stride(0), x_scale.stride(0), w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1),
        hidden_states.stride(0),
        TOP_K=top_k, HIDDEN=hidden, WIDTH=width, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        FP8=fp8, UPCAST=upcast,
    )  # fmt: skip
    h_in, h_scale = per_token_group_quant_fp8(hidden_states) if fp8 else (hidden_states, hidden_states)
    w2_scale = w2_scale_inv if w2_scale_inv is not None else w2  # i.e. if fp8 (asserted above)
    _down_kernel[(tile_experts.numel(), triton.cdiv(hidden, block_n))](
        h_in, h_scale, w2, w2_scale, topk_weights.contiguous().view(-1), weighted, sorted_ids, tile_experts, pairs,
        h_in.stride(0), h_scale.stride(0), w2.stride(0), w2.stride(1), w2_scale.stride(0), w2_scale.stride(1),
        weighted.stride(0),
        HIDDEN=hidden, WIDTH=width, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, FP8=fp8, UPCAST=upcast,
    )  # fmt: skip
    return weighted.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)  # the top-k combine
