"""Multi-head latent attention (DeepSeek-V2/V3) over a paged latent cache.

Only `[norm(c_KV) | rope(k_pe)]` is cached per token and layer (C + R values), never per-head K/V.
- Decode absorbs W_UK into the query (q~ = W_UK^T q_nope, C-dim), attends over the latent rows as
  one shared head (MQA with head dim C + R), then applies W_UV to the attended latent.
- Prefill over a cached prefix does the same, causally, through the paged prefill kernel: the
  prefix is read from the paged cache where it lies, never expanded into per-head K/V.
- Prefill without any cached prefix (the context is just the step's new tokens) expands their
  latents into per-head K/V with kv_b_proj and runs ordinary causal attention, one sequence at a
  time: per query-key pair that is Dn + R + Dv multiply-adds per head against C + R + C absorbed
  (R1: 320 against 1088), as SGLang and vLLM also choose for fresh prompts.

Tensor parallelism splits by heads: q_b_proj (or q_proj) and kv_b_proj are column-parallel over
heads, o_proj row-parallel (one all-reduce); q_a/kv_a and their norms are replicated, so every
rank caches the same latent (the cache is replicated, not split).

Dimension legend: T tokens in the step, B decode sequences, H heads (per rank), C kv_lora_rank,
R qk_rope_head_dim, Dn qk_nope_head_dim, Dv v_head_dim, L context tokens, E hidden size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ponder import kernels
from ponder.engine.config import ModelConfig
from ponder.engine.errors import ModelLoadError
from ponder.engine.runtime.distributed import tp_size
from ponder.engine.runtime.layers.attention import AttentionMetadata
from ponder.engine.runtime.layers.linear import ColumnParallelLinear, Linear, RowParallelLinear, fp8_packable
from ponder.engine.runtime.layers.norm import RMSNorm
from ponder.engine.runtime.layers.rotary import RotaryEmbedding

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm use the default eps, not rms_norm_eps


class MLAAttention(nn.Module):
    def __init__(self, config: ModelConfig, rotary: RotaryEmbedding, scale: float, fp8: bool = False) -> None:
        super().__init__()
        extra = config.extra
        if config.attention_bias:
            raise ModelLoadError("deepseek_v3 with attention_bias is not supported")
        total_heads = config.num_attention_heads
        self.num_heads = total_heads // tp_size()
        self.q_lora_rank = extra.get("q_lora_rank")
        self.kv_lora_rank = int(extra["kv_lora_rank"])
        self.nope_dim, self.rope_dim = int(extra["qk_nope_head_dim"]), int(extra["qk_rope_head_dim"])
        self.v_dim = int(extra["v_head_dim"])
        self.qk_dim = self.nope_dim + self.rope_dim
        self.scale = scale
        self.rotary = rotary
        hidden, heads, latent = config.hidden_size, self.num_heads, self.kv_lora_rank
        self.q_size = self.q_lora_rank or heads * self.qk_dim  # q_a_proj output, or q_proj without q_lora
        # q_a_proj (or q_proj) and kv_a_proj_with_mqa read the same input: one matmul. FP8 weights
        # pack only when q's rows are whole scale blocks (R1: 1536 yes; tiny-r1-fp8: 96 no). A
        # split q_proj (no q_lora, several ranks) cannot pack with the replicated kv_a.
        self.packed_qkv_a = (not fp8 or fp8_packable([self.q_size, latent + self.rope_dim])) and (
            bool(self.q_lora_rank) or tp_size() == 1
        )
        if self.packed_qkv_a:
            self.fused_qkv_a_proj = Linear(
                hidden,
                self.q_size + latent + self.rope_dim,
                shard_sizes={"q": self.q_size, "kv_a": latent + self.rope_dim},
                fp8=fp8,
            )
        elif self.q_lora_rank:
            self.q_a_proj = Linear(hidden, self.q_size, fp8=fp8)
        else:
            self.q_proj = ColumnParallelLinear(hidden, total_heads * self.qk_dim, fp8=fp8)
        if not self.packed_qkv_a:
            self.kv_a_proj_with_mqa = Linear(hidden, latent + self.rope_dim, fp8=fp8)
        if self.q_lora_rank:
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = ColumnParallelLinear(self.q_lora_rank, total_heads * self.qk_dim, fp8=fp8)
        self.kv_a_layernorm = RMSNorm(latent, LATENT_NORM_EPS)
        # per head k_nope | v. In FP8 keep mode it stays FP8 for the prefill expansion; prepack
        # dequantises it once for the absorbed decode weights w_uk / w_uv (small: H*(Dn+Dv)*C).
        self.kv_b_proj = ColumnParallelLinear(latent, total_heads * (self.nope_dim + self.v_dim), fp8=fp8)
        self.o_proj = RowParallelLinear(total_heads * self.v_dim, hidden, fp8=fp8)
        self.kv_cache = torch.empty(0)  # [num_blocks, block_size, C + R], set by the model runner
        self.w_uk = torch.empty(0)  # [H, Dn, C], from kv_b_proj once loaded
        self.w_uv = torch.empty(0)  # [H, C, Dv]

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> dict[str, tuple[int, ...]]:
        return {"kv_cache": (num_blocks, block_size, self.kv_lora_rank + self.rope_dim)}

    def prepack(self) -> None:
        """Split kv_b_proj into the absorbed decode weights (called once the weights are loaded)."""
        weight: torch.Tensor = self.kv_b_proj.weight
        if self.kv_b_proj.fp8:  # in the model's dtype (the latent norm's)
            weight = self.kv_b_proj.dequantized_weight(self.kv_a_layernorm.weight.dtype)
        w_kv = weight.view(self.num_heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        self.w_uk = w_kv[:, : self.nope_dim].contiguous()  # [H, Dn, C]
        self.w_uv = w_kv[:, self.nope_dim :].transpose(1, 2).contiguous()  # [H, C, Dv]

    def forward(self, positions: torch.Tensor, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        num_tokens, heads = x.shape[0], self.num_heads
        if self.packed_qkv_a:
            q, kv_a = self.fused_qkv_a_proj(x).split([self.q_size, self.kv_lora_rank + self.rope_dim], dim=-1)
        else:
            q = (self.q_a_proj if self.q_lora_rank else self.q_proj)(x)
            kv_a = self.kv_a_proj_with_mqa(x)
        if self.q_lora_rank:
            q = self.q_b_proj(self.q_a_layernorm(q.contiguous()))
        q = q.view(num_tokens, heads, self.qk_dim)  # [T, H, Dn + R]
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        c_kv, k_pe = kv_a.split([self.kv_lora_rank, self.rope_dim], dim=-1)  # [T, C], [T, R]
        roped = self.rotary(positions, torch.cat([q_pe, k_pe.unsqueeze(1)], dim=1))  # [T, H + 1, R]
        q_pe, k_pe = roped[:, :heads], roped[:, heads]
        latent = torch.cat([self.kv_a_layernorm(c_kv.contiguous()), k_pe], dim=-1)  # [T, C + R]
        kernels.store_latent_cache(latent, self.kv_cache, meta.slot_mapping)
        num_decode = meta.num_decode_tokens
        parts = []
        if num_decode:
            parts.append(self.decode(q_nope[:num_decode], q_pe[:num_decode], meta))
        if num_decode < num_tokens:
            parts.append(self.prefill(q_nope[num_decode:], q_pe[num_decode:], latent[num_decode:], meta))
        out = parts[0] if len(parts) == 1 else torch.cat(parts)  # [T, H, Dv]
        return self.o_proj(out.reshape(num_tokens, heads * self.v_dim))

    def decode(self, q_nope: torch.Tensor, q_pe: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q_nope [B, H, Dn], q_pe [B, H, R] -> [B, H, Dv]
        attended = kernels.paged_mla_decode(
            self._absorbed_query(q_nope, q_pe),
            self.kv_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            self.kv_lora_rank,
            self.scale,
        )  # [B, H, C]
        return self._values(attended)

    def prefill(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # q_nope [T', H, Dn], q_pe [T', H, R], latent [T', C + R]: the prefill sequences' new tokens
        # back to back -> [T', H, Dv]
        spans = meta.prefill_spans()
        # A cached prefix anywhere in the step: absorbed, reading every prefix where it lies in the
        # paged cache; a step of fresh prompts only: expanded, fewer FLOPs (module docstring).
        if any(context_len > end - start for start, end, context_len in spans):
            attended = kernels.paged_mla_prefill(
                self._absorbed_query(q_nope, q_pe),
                self.kv_cache,
                meta.prefill_block_tables,
                meta.prefill_query_start_loc,
                meta.prefill_context_lens,
                meta.max_prefill_query_len,
                self.kv_lora_rank,
                self.scale,
            )  # [T', H, C]
            return self._values(attended)
        query = torch.cat([q_nope, q_pe], dim=-1)  # [T', H, Dn + R]
        return torch.cat([self._expanded_attention(query[start:end], latent[start:end]) for start, end, _ in spans])

    def _absorbed_query(self, q_nope: torch.Tensor, q_pe: torch.Tensor) -> torch.Tensor:
        # q_nope [T, H, Dn], q_pe [T, H, R] -> [T, H, C + R]: W_UK folded into the query
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, C]
        return torch.cat([q_latent, q_pe], dim=-1)

    def _values(self, attended: torch.Tensor) -> torch.Tensor:
        # attended latents [T, H, C] -> [T, H, Dv] through W_UV
        return torch.bmm(attended.transpose(0, 1), self.w_uv).transpose(0, 1)

    def _expanded_attention(self, query: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        # query [L, H, Dn + R] and latent [L, C + R] of one sequence with no cached prefix -> [L, H, Dv]
        length = latent.shape[0]
        kv = self.kv_b_proj(latent[:, : self.kv_lora_rank]).view(length, self.num_heads, -1)  # [L, H, Dn + Dv]
        k_nope, value = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_pe = latent[:, None, self.kv_lora_rank :].expand(length, self.num_heads, self.rope_dim)
        key = torch.cat([k_nope, k_pe], dim=-1)  # [L, H, Dn + R]
        out = F.scaled_dot_product_attention(
            query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), is_causal=True, scale=self.scale
        )  # [H, L, Dv]
        return out.transpose(0, 1)
