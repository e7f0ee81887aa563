"""Paged attention for MHA/GQA models: store the step's K/V into the cache, then attend.

The model runner orders each step's tokens decodes-first, so the batch splits into two batched
calls: one token per sequence (decode) and back-to-back prompt chunks (prefill over a cached prefix).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ponder import kernels


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] cache slot of each token
    block_size: int
    num_decode_tokens: int  # tokens [0, num_decode_tokens) are one-token decodes
    decode_block_tables: torch.Tensor  # [Bd, M]
    decode_context_lens: torch.Tensor  # [Bd]
    prefill_block_tables: torch.Tensor  # [Bp, M]
    prefill_query_start_loc: torch.Tensor  # [Bp + 1]
    prefill_context_lens: torch.Tensor  # [Bp]
    max_prefill_query_len: int
    _plans: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(
        cls,
        positions: list[int],  # [T]
        query_lens: list[int],  # [B]
        context_lens: list[int],  # [B]
        block_tables: list[list[int]],  # [B][M]
        num_decodes: int,
        block_size: int,
        device: torch.device,
    ) -> AttentionMetadata:
        """A step's metadata from its plan's lists (decodes first, then prefill spans)."""

        def tensor(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.int64, device=device)

        tables = tensor(_pad(block_tables))  # [B, M]
        position_t = tensor(positions)  # [T]
        seq_index = torch.repeat_interleave(torch.arange(len(query_lens), device=device), tensor(query_lens))  # [T]
        slot_mapping = tables[seq_index, position_t // block_size] * block_size
        slot_mapping += position_t % block_size
        prefill_lens = query_lens[num_decodes:]
        start_loc = [0]
        for n in prefill_lens:
            start_loc.append(start_loc[-1] + n)
        return cls(
            slot_mapping=slot_mapping,
            block_size=block_size,
            num_decode_tokens=num_decodes,
            decode_block_tables=tensor(_pad(block_tables[:num_decodes])),
            decode_context_lens=tensor(context_lens[:num_decodes]),
            prefill_block_tables=tensor(_pad(block_tables[num_decodes:])),
            prefill_query_start_loc=tensor(start_loc),
            prefill_context_lens=tensor(context_lens[num_decodes:]),
            max_prefill_query_len=max(prefill_lens, default=0),
        )

    def prefill_plan(self, groups: int, dtype: torch.dtype) -> kernels.PrefillPlan:
        """Index maps and mask of the prefill part, built once per step and shared by every layer."""
        key = (groups, dtype)
        if key not in self._plans:
            self._plans[key] = kernels.prefill_plan(
                self.prefill_query_start_loc,
                self.prefill_context_lens,
                self.max_prefill_query_len,
                groups,
                self.prefill_block_tables.shape[1] * self.block_size,
                dtype,
            )
        return self._plans[key]

    def prefill_spans(self) -> list[tuple[int, int, int]]:
        """(start, end, context length) of each prefill sequence's new tokens, for per-sequence loops."""
        if "spans" not in self._plans:
            starts = self.prefill_query_start_loc.tolist()
            lengths = self.prefill_context_lens.tolist()
            self._plans["spans"] = [(starts[i], starts[i + 1], n) for i, n in enumerate(lengths)]
        return self._plans["spans"]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = (
            num_heads,
            num_kv_heads,
            head_dim,
            scale,
        )
        # Set by the model runner: [num_blocks, block_size, num_kv_heads, head_dim] each.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> dict[str, tuple[int, ...]]:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        return {"k_cache": shape, "v_cache": shape}

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q [T, H, D]; k, v [T, K, D] -> [T, H, D]
        kernels.store_kvcache(k, v, self.k_cache, self.v_cache, meta.slot_mapping)
        num_decode = meta.num_decode_tokens
        if num_decode == q.shape[0]:
            return kernels.paged_decode_attention(
                q, self.k_cache, self.v_cache, meta.decode_block_tables, meta.decode_context_lens, self.scale
            )
        # The torch reference shares one mask per step across layers; the kernels need none.
        groups = self.num_heads // self.num_kv_heads
        plan = meta.prefill_plan(groups, q.dtype) if kernels.prefill_uses_reference(q) else None
        prefill = kernels.paged_prefill_attention(
            q[num_decode:],
            self.k_cache,
            self.v_cache,
            meta.prefill_block_tables,
            meta.prefill_query_start_loc,
            meta.prefill_context_lens,
            meta.max_prefill_query_len,
            self.scale,
            plan=plan,
        )
        if num_decode == 0:
            return prefill
        decode = kernels.paged_decode_attention(
            q[:num_decode],
            self.k_cache,
            self.v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            self.scale,
        )
        return torch.cat([decode, prefill])


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]
