"""Hot ops behind one dispatch point: the engine's layers call only these functions.

CUDA tensors take the Triton kernels (ponder/kernels/triton_kernels). CPU tensors take the C++ kernels
where one exists and could be built (ponder/kernels/cpu), else the pure-torch reference
(ponder/kernels/reference.py), which stays the test oracle of every kernel.

`TRITON_ON_CPU` (env PONDER_TRITON_ON_CPU=1, honoured only under TRITON_INTERPRET=1) sends CPU
tensors to the Triton kernels too, through Triton's interpreter: how the tests run the whole engine
on its GPU path on a machine without one.
"""

from __future__ import annotations

import os

import torch

from ponder.kernels import cpu, reference
from ponder.kernels.reference import (
    PrefillPlan,
    prefill_plan,
)

TRITON_ON_CPU = os.environ.get("PONDER_TRITON_ON_CPU") == "1" and os.environ.get("TRITON_INTERPRET") == "1"


def _triton(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda or TRITON_ON_CPU


def _cpu_ops(tensor: torch.Tensor):
    return cpu.load() if tensor.device.type == "cpu" else None


def prepare(device: torch.device) -> None:
    """Build (or load) the kernels `device` uses now, not in the first step: the CPU kernels are
    compiled on first use (a minute or two on a small machine, again for every new checkout),
    and an engine should not take work until it can run it at speed."""
    if device.type == "cpu" and not TRITON_ON_CPU:
        cpu.load()


def prefill_uses_reference(query: torch.Tensor) -> bool:
    return not _triton(query) and _cpu_ops(query) is None


def store_kvcache(
    key: torch.Tensor,  # [T, K, D]
    value: torch.Tensor,  # [T, K, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,  # [N, S, K, D]
    slot_mapping: torch.Tensor,  # [T] block * S + offset; -1 = skip
) -> None:
    if _triton(key):
        from ponder.kernels.triton_kernels.kv_store import store_kvcache as triton_store_kvcache

        return triton_store_kvcache(key, value, k_cache, v_cache, slot_mapping)
    return reference.store_kvcache(key, value, k_cache, v_cache, slot_mapping)


def store_latent_cache(
    latent: torch.Tensor,  # [T, C + R]
    cache: torch.Tensor,  # [N, S, C + R]
    slot_mapping: torch.Tensor,  # [T]; -1 = skip
) -> None:
    if _triton(latent):
        from ponder.kernels.triton_kernels.kv_store import store_latent_cache as triton_store_latent_cache

        return triton_store_latent_cache(latent, cache, slot_mapping)
    return reference.store_latent_cache(latent, cache, slot_mapping)


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M] int64
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
) -> torch.Tensor:  # [B, H, D]
    if _triton(query):
        from ponder.kernels.triton_kernels.paged_decode import paged_decode_attention as triton_decode

        return triton_decode(query, k_cache, v_cache, block_tables, context_lens, scale)
    if query.shape[-1] % 16 == 0 and (ops := _cpu_ops(query)) is not None:
        return ops.paged_decode_attention(query.contiguous(), k_cache, v_cache, block_tables, context_lens, scale)
    return reference.paged_decode_attention(query, k_cache, v_cache, block_tables, context_lens, scale)


MLA_DECODE_DIMS = (80, 160, 576)  # latent row widths the CPU decode kernel is built for


def paged_mla_decode(
    query: torch.Tensor,  # [B, H, C + R]
    cache: torch.Tensor,  # [N, S, C + R]
    block_tables: torch.Tensor,  # [B, M]
    context_lens: torch.Tensor,  # [B]
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:  # [B, H, C]
    if _triton(query):
        from ponder.kernels.triton_kernels.mla_decode import paged_mla_decode as triton_mla_decode

        return triton_mla_decode(query, cache, block_tables, context_lens, kv_lora_rank, scale)
    if cache.shape[-1] in MLA_DECODE_DIMS and (ops := _cpu_ops(query)) is not None:
        # The latent row is both key and value (its first C entries): MQA with one kv head. The
        # value's rope tail is computed and dropped (R of C + R), which beats copying the cache.
        latents = cache.unsqueeze(2)  # [N, S, 1, C + R]
        out = ops.paged_decode_attention(query.contiguous(), latents, latents, block_tables, context_lens, scale)
        return out[..., :kv_lora_rank]
    return reference.paged_mla_decode(query, cache, block_tables, context_lens, kv_lora_rank, scale)


def paged_prefill_attention(
    query: torch.Tensor,  # [T, H, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M]
    query_start_loc: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B]
    max_query_len: int,
    scale: float,
    plan: PrefillPlan | None = None,  # the reference's precomputed masks, when it runs
) -> torch.Tensor:  # [T, H, D]
    if _triton(query):
        from ponder.kernels.triton_kernels.prefill import paged_prefill_attention as triton_prefill

        return triton_prefill(
            query, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale
        )
    if (ops := _cpu_ops(query)) is not None:
        return ops.paged_prefill_attention(
            query.contiguous(), k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
        )
    return reference.paged_prefill_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale, plan
    )


def paged_mla_prefill(
    query: torch.Tensor,  # [T, H, C + R]: absorbed q_nope | roped q_pe
    cache: torch.Tensor,  # [N, S, C + R]
    block_tables: torch.Tensor,  # [B, M]
    query_start_loc: torch.Tensor,  # [B+1]
    context_lens: torch.Tensor,  # [B]
    max_query_len: int,
    kv_lora_rank: int,
    scale: float,
) -> torch.Tensor:  # [T, H, C]
    if _triton(query):
        from ponder.kernels.triton_kernels.prefill import paged_mla_prefill as triton_mla_prefill

        return triton_mla_prefill(
            query, cache, block_tables, query_start_loc, context_lens, max_query_len, kv_lora_rank, scale
        )
    # Elsewhere the GQA prefill serves: one kv head, the latent row as key and value (its rope tail
    # is attended and dropped, R of C + R, which beats copying the cache).
    latents = cache.unsqueeze(2)  # [N, S, 1, C + R]
    out = paged_prefill_attention(
        query, latents, latents, block_tables, query_start_loc, context_lens, max_query_len, scale
    )
    return out[..., :kv_lora_rank]


def grouped_topk(
    scores: torch.Tensor,  # [T, X] sigmoid router scores, fp32
    correction_bias: torch.Tensor,  # [X]
    top_k: int,
    num_groups: int,
    topk_groups: int,
    renormalize: bool,
    scaling: float,
) -> tuple[torch.Tensor, torch.Tensor]:  # weights [T, k] fp32, expert ids [T, k] int64
    if _triton(scores):
        from ponder.kernels.triton_kernels.topk_router import grouped_topk as triton_grouped_topk

        return triton_grouped_topk(scores, correction_bias, top_k, num_groups, topk_groups, renormalize, scaling)
    return reference.grouped_topk(scores, correction_bias, top_k, num_groups, topk_groups, renormalize, scaling)


def fused_moe(
    x: torch.Tensor,  # [T, E] hidden states
    w13: torch.Tensor,  # [X, 2I, E] gate|up of every expert
    w2: torch.Tensor,  # [X, E, I] down of every expert
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    expert_map: torch.Tensor | None = None,  # [X_global] global id -> local id, -1 = another rank's
) -> torch.Tensor:  # [T, E]
    """Routed experts. With `expert_map` (expert parallelism) w13/w2 hold this rank's experts only,
    the ids are the router's global ones, and pairs whose expert maps to -1 add nothing."""
    if _triton(x):
        from ponder.kernels.triton_kernels.fused_moe import fused_moe as triton_fused_moe

        return triton_fused_moe(x, w13, w2, topk_weights, topk_ids, expert_map=expert_map)
    return reference.fused_moe(x, w13, w2, topk_weights, topk_ids, expert_map)


def fused_moe_fp8(
    x: torch.Tensor,  # [T, E] hidden states
    w13: torch.Tensor,  # [X, 2I, E] float8_e4m3fn gate|up of every expert
    w13_scale_inv: torch.Tensor,  # [X, 2*ceil(I/128), ceil(E/128)]
    w2: torch.Tensor,  # [X, E, I] float8_e4m3fn
    w2_scale_inv: torch.Tensor,  # [X, ceil(E/128), ceil(I/128)]
    topk_weights: torch.Tensor,  # [T, k]
    topk_ids: torch.Tensor,  # [T, k]
    expert_map: torch.Tensor | None = None,  # [X_global] -> local id or -1, as in fused_moe
) -> torch.Tensor:  # [T, E]
    """Routed FP8 experts: the fused Triton MoE in its FP8 mode on CUDA; elsewhere the reference,
    one expert at a time through `fp8_linear` (same quantisation, dequantised operands)."""
    if _triton(x):
        from ponder.kernels.triton_kernels.fused_moe import fused_moe as triton_fused_moe

        return triton_fused_moe(x, w13, w2, topk_weights, topk_ids, w13_scale_inv, w2_scale_inv, expert_map)
    return reference.fused_moe_fp8(
        x, w13, w13_scale_inv, w2, w2_scale_inv, topk_weights, topk_ids, fp8_linear, expert_map
    )


def prepack_linear(weight: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked layout of a [out, in] weight for CPU matmuls (None where not applicable).
    Packing once instead of on every call is worth 15-40% of a linear on the CPU."""
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if not torch.backends.mkldnn.is_available():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 64)


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, packed: torch.Tensor | None = None
) -> torch.Tensor:  # [T, in] -> [T, out]
    if packed is not None and x.device.type == "cpu" and x.dtype == weight.dtype:
        return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
    return torch.nn.functional.linear(x, weight, bias)


def fp8_linear(
    x: torch.Tensor,  # [..., K]
    weight: torch.Tensor,  # [N, K] float8_e4m3fn
    weight_scale_inv: torch.Tensor,  # [ceil(N/128), ceil(K/128)] fp32
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,  # default: x's dtype
) -> torch.Tensor:  # [..., N]
    """FP8 block-scaled linear (activations quantised per token per 128 channels): the Triton GEMM
    on CUDA, the reference (same numerics, dequantised operands) elsewhere."""
    if _triton(x):
        from ponder.kernels.triton_kernels import fp8_gemm

        return fp8_gemm.fp8_linear(x, weight, weight_scale_inv, bias, out_dtype)
    return reference.fp8_linear(x, weight, weight_scale_inv, bias, out_dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None) -> torch.Tensor:
    """weight * x / rms(x); with `residual`, first residual += x (in place) and normalise that."""
    if x.dim() == 2 and x.stride(-1) == 1 and (ops := _cpu_ops(x)) is not None:
        if residual is None:
            return ops.rms_norm(x, weight, eps)
        return ops.fused_add_rms_norm(x, residual, weight, eps)
    return reference.rms_norm(x, weight, eps, residual)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [T, 2I] -> [T, I]
    if x.dim() == 2 and (ops := _cpu_ops(x)) is not None:
        return ops.silu_and_mul(x)
    return reference.silu_and_mul(x)


__all__ = [
    "fp8_linear",
    "fused_moe",
    "fused_moe_fp8",
    "grouped_topk",
    "linear",
    "prepack_linear",
    "PrefillPlan",
    "paged_decode_attention",
    "paged_mla_decode",
    "paged_prefill_attention",
    "prefill_plan",
    "prefill_uses_reference",
    "rms_norm",
    "silu_and_mul",
    "store_kvcache",
    "store_latent_cache",
]
