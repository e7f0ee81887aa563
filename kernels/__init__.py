"""Hot ops behind one dispatch point: the engine's layers call only these functions.

CPU tensors take the C++ kernels where one exists and could be built (kernels/cpu), else the
pure-torch reference (kernels/reference.py), which stays the test oracle of every kernel. The
Triton kernels take over for CUDA tensors as they land.
"""

from __future__ import annotations

import torch

from kernels import cpu, reference
from kernels.reference import PrefillPlan, prefill_plan, store_kvcache


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
    "PrefillPlan",
    "paged_decode_attention",
    "paged_prefill_attention",
    "prefill_plan",
    "prefill_uses_reference",
    "rms_norm",
    "silu_and_mul",
    "store_kvcache",
]
