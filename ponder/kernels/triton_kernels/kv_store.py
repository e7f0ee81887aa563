"""Store the step's keys/values into the paged caches, driven by a slot mapping (-1 = skip).

Dimension legend: T tokens in the step, K kv heads, D head dim, N cache blocks, S block size,
W = C + R latent row width (MLA). A slot is block * S + offset.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _store_kvcache_kernel(
    key_ptr,  # [T, K, D]
    value_ptr,  # [T, K, D]
    k_cache_ptr,  # [N, S, K, D]
    v_cache_ptr,  # [N, S, K, D]
    slot_ptr,  # [T]
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cn,  # k and v caches share their strides (asserted by the launcher)
    stride_cs,
    stride_ch,
    block_size,
    head_dim,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    dims = tl.arange(0, BLOCK_D)  # [BLOCK_D]
    mask = dims < tl.where(slot >= 0, head_dim, 0)  # slot -1: nothing is read or written
    block, offset = slot // block_size, slot % block_size
    key = tl.load(key_ptr + token * stride_kt + head * stride_kh + dims, mask=mask)
    value = tl.load(value_ptr + token * stride_vt + head * stride_vh + dims, mask=mask)
    dest = block * stride_cn + offset * stride_cs + head * stride_ch + dims  # [BLOCK_D]
    tl.store(k_cache_ptr + dest, key, mask=mask)
    tl.store(v_cache_ptr + dest, value, mask=mask)


@triton.jit
def _store_latent_kernel(
    latent_ptr,  # [T, W]
    cache_ptr,  # [N, S, W]
    slot_ptr,  # [T]
    stride_lt,
    stride_cn,
    stride_cs,
    block_size,
    width,
    BLOCK_W: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    cols = tl.arange(0, BLOCK_W)  # [BLOCK_W]
    mask = cols < tl.where(slot >= 0, width, 0)  # slot -1: nothing is read or written
    row = tl.load(latent_ptr + token * stride_lt + cols, mask=mask)
    dest = (slot // block_size) * stride_cn + (slot % block_size) * stride_cs + cols
    tl.store(cache_ptr + dest, row, mask=mask)


def _check_slots(slot_mapping: torch.Tensor, num_tokens: int, device: torch.device) -> None:
    assert slot_mapping.shape == (num_tokens,), f"slot_mapping {tuple(slot_mapping.shape)} != ({num_tokens},)"
    assert slot_mapping.dtype in (torch.int64, torch.int32), f"slot_mapping dtype {slot_mapping.dtype}"
    assert slot_mapping.is_contiguous() and slot_mapping.device == device


def store_kvcache(
    key: torch.Tensor,  # [T, K, D]
    value: torch.Tensor,  # [T, K, D]
    k_cache: torch.Tensor,  # [N, S, K, D]
    v_cache: torch.Tensor,  # [N, S, K, D]
    slot_mapping: torch.Tensor,  # [T] block * S + offset; -1 = skip
) -> None:
    num_tokens, num_kv_heads, head_dim = key.shape
    assert value.shape == key.shape, f"value {tuple(value.shape)} != key {tuple(key.shape)}"
    assert k_cache.dim() == 4 and k_cache.shape[2:] == (num_kv_heads, head_dim), f"k_cache {tuple(k_cache.shape)}"
    assert v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), "k/v caches differ in layout"
    assert key.dtype == value.dtype == k_cache.dtype == v_cache.dtype, "key, value and caches must share a dtype"
    assert key.stride(-1) == value.stride(-1) == k_cache.stride(-1) == 1, "head dim must be contiguous"
    _check_slots(slot_mapping, num_tokens, key.device)
    if num_tokens == 0:
        return
    _store_kvcache_kernel[(num_tokens, num_kv_heads)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        k_cache.shape[1], head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim),
    )  # fmt: skip


def store_latent_cache(
    latent: torch.Tensor,  # [T, W]: normed c_KV | roped k_pe
    cache: torch.Tensor,  # [N, S, W]
    slot_mapping: torch.Tensor,  # [T]; -1 = skip
) -> None:
    num_tokens, width = latent.shape
    assert cache.dim() == 3 and cache.shape[2] == width, f"cache {tuple(cache.shape)} vs latent width {width}"
    assert latent.dtype == cache.dtype, f"latent {latent.dtype} != cache {cache.dtype}"
    assert latent.stride(-1) == cache.stride(-1) == 1, "latent rows must be contiguous"
    _check_slots(slot_mapping, num_tokens, latent.device)
    if num_tokens == 0:
        return
    _store_latent_kernel[(num_tokens,)](
        latent, cache, slot_mapping,
        latent.stride(0), cache.stride(0), cache.stride(1),
        cache.shape[1], width,
        BLOCK_W=triton.next_power_of_2(width),
    )  # fmt: skip
