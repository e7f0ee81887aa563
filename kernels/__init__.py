"""Hot ops behind one dispatch point: the engine's layers call only these functions.

CPU tensors take the C++ kernels where one exists and could be built (kernels/cpu), else the
pure-torch reference (kernels/reference.py), which stays the test oracle of every kernel. The
Triton kernels take over for CUDA tensors as they land.
"""

from __future__ import annotations

import torch

from kernels import cpu, reference
from kernels.reference import (
    PrefillPlan,
    fused_moe,
    grouped_topk,
    prefill_plan,
    store_kvcache,
    store_latent_cache,
)


def _cpu_ops(tensor: torch.Tensor):
    return cpu.load() if tensor.device.type == "cpu" else None


def prefill_uses_reference(query: torch.Tensor) -> bool:
    return _cpu_ops(query) is None


def paged_decode_attention(
    query: torch.Tensor,  # [B, H, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [B, M] int64
    context_lens: torch.Tensor,  # [B] int64
    scale: float,
) -> torch.Tensor:  # [B, H, D]
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
    if (ops := _cpu_ops(query)) is not None:
        return ops.paged_prefill_attention(
            query.contiguous(), k_cache, v_cache, block_tables, query_start_loc, context_lens, scale
        )
    return reference.paged_prefill_attention(
        query, k_cache, v_cache, block_tables, query_start_loc, context_lens, max_query_len, scale, plan
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
    "fused_moe",
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
