"""DeepSeek-V3 / R1 decoder: MLA attention over a paged latent cache, YaRN rope on the rope dims,
dense MLPs for the first `first_k_dense_replace` layers and DeepSeekMoE after.

Dimension legend: T tokens in the step, E hidden size, V vocab.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ponder.engine.config import ModelConfig
from ponder.engine.runtime.distributed import ep_enabled, local_experts
from ponder.engine.runtime.layers.attention import AttentionMetadata
from ponder.engine.runtime.layers.linear import Linear
from ponder.engine.runtime.layers.mla import MLAAttention
from ponder.engine.runtime.layers.mlp import DenseMLP
from ponder.engine.runtime.layers.moe import EXPERT_PROJECTIONS, DeepseekMoE
from ponder.engine.runtime.layers.norm import RMSNorm
from ponder.engine.runtime.layers.rotary import RotaryEmbedding, rope_frequencies, yarn_mscale
from ponder.engine.runtime.models.base import CausalLM, DecoderLayer, DecoderModel, packed_parameter

LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.(.*)")
# The MTP layer's own tensors; the rest of `model.layers.{N}.` is its decoder block.
MTP_OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
# Copies of the model's embedding and LM head in the MTP layer (the paper shares them): not loaded.
MTP_SHARED = ("embed_tokens.", "shared_head.head.")
EXPERT_NAME = re.compile(r"(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?$")


def softmax_scale(config: ModelConfig) -> float:
    """qk_head_dim^-0.5, times mscale^2 under YaRN with mscale_all_dim (R1: 0.13523 instead of 0.0722)."""
    extra, scaling = config.extra, config.rope_scaling or {}
    scale = (extra["qk_nope_head_dim"] + extra["qk_rope_head_dim"]) ** -0.5
    if scaling.get("rope_type") and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


class DeepseekV3DecoderLayer(DecoderLayer):
    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding, fp8: bool = False) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAAttention(config, rotary, softmax_scale(config), fp8)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if index < int(config.extra.get("first_k_dense_replace", 0)):
            self.mlp = DenseMLP(config.hidden_size, config.intermediate_size, fp8)
        else:
            self.mlp = DeepseekMoE(config, fp8)


class DeepseekV3Model(DecoderModel):
    def __init__(self, config: ModelConfig, max_position: int, fp8: bool = False) -> None:
        super().__init__(config)
        rope_dim = int(config.extra["qk_rope_head_dim"])
        inv_freq, magnitude = rope_frequencies(rope_dim, config.rope_theta, config.rope_scaling)
        interleaved = bool(config.extra.get("rope_interleave", True))
        self.rotary = RotaryEmbedding(rope_dim, max_position, inv_freq, magnitude, interleaved)  # shared by all layers
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(config, i, self.rotary, fp8) for i in range(config.num_hidden_layers)
        )


class SharedHead(nn.Module):
    """The MTP layer's final norm (its `head` is the model's lm_head)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MultiTokenPredictor(nn.Module):
    """DeepSeek-V3's multi-token-prediction layer (`model.layers.61` in R1), the speculative drafter:
    from the model's final hidden state h_i at position i and the embedding of token i+1 it predicts
    token i+2. One decoder layer (MLA + MoE, with its own latent cache at the same positions) over
    eh_proj([enorm(embed(t_i+1)); hnorm(h_i)]); the output, through its norm and the model's head,
    gives the draft, and is itself the `previous_hidden` of the next draft when drafting k > 1."""

    def __init__(self, config: ModelConfig, index: int, rotary: RotaryEmbedding, fp8: bool = False) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.enorm = RMSNorm(hidden, config.rms_norm_eps)
        self.hnorm = RMSNorm(hidden, config.rms_norm_eps)
        self.eh_proj = Linear(2 * hidden, hidden)  # bf16 in the official checkpoints, replicated
        self.block = DeepseekV3DecoderLayer(config, index, rotary, fp8)
        self.shared_head = SharedHead(config)

    def forward(
        self, positions: torch.Tensor, embeds: torch.Tensor, previous_hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        # embeds [T, E] of tokens i+1, previous_hidden [T, E] at positions i -> [T, E]
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1))
        x, residual = self.block(positions, x, None, meta)
        return x + residual


class DeepseekV3ForCausalLM(CausalLM):
    packed_modules = {
        "q_a_proj": ("fused_qkv_a_proj", "q"),
        "q_proj": ("fused_qkv_a_proj", "q"),
        "kv_a_proj_with_mqa": ("fused_qkv_a_proj", "kv_a"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    def __init__(self, config: ModelConfig, max_position: int, fp8: bool = False, mtp: bool = False) -> None:
        """With `fp8` every attention, MLP, expert and shared-expert linear holds float8_e4m3fn
        weights and their block scales, as the official checkpoints store them; embeddings, norms,
        the router and lm_head stay in the engine dtype. Projections whose FP8 scales cannot share
        a packed weight stay separate parameters under their checkpoint names. With `mtp` the first
        multi-token-prediction layer is loaded too (the speculative drafter)."""
        model = DeepseekV3Model(config, max_position, fp8)
        super().__init__(config, model)
        self.mtp = MultiTokenPredictor(config, config.num_hidden_layers, model.rotary, fp8) if mtp else None
        self._parameter_names = {name for name, _ in self.named_parameters()}
        # Under expert parallelism, the routed experts this rank holds (global ids).
        self._local_experts = local_experts(int(config.extra.get("n_routed_experts") or 0)) if ep_enabled() else None

    def propose(
        self, input_ids: torch.Tensor, positions: torch.Tensor, previous_hidden: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """The MTP layer's hidden states [T, E] for tokens i+1 [T] at positions i [T]."""
        assert self.mtp is not None, "built without the MTP layer"
        return self.mtp(positions, self.model.embed_tokens(input_ids), previous_hidden, meta)

    def compute_draft_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[B, E] MTP hidden states -> [B, V] fp32 logits on rank 0 (None on the other ranks)."""
        assert self.mtp is not None, "built without the MTP layer"
        return self.compute_logits(self.mtp.shared_head.norm(hidden))

    def parameter_for(self, name: str) -> tuple[str, object]:
        """Checkpoint name -> (parameter, shard): the MTP layer's tensors to `mtp.` (its decoder
        block's to `mtp.block.`); per-expert tensors go to their slot of the stacked expert weights;
        projections to their packed parameter."""
        if (match := LAYER_NAME.match(name)) and int(match.group(1)) == self.config.num_hidden_layers:
            rest = match.group(2)
            name = f"mtp.{rest}" if rest.startswith(MTP_OWN) else f"mtp.block.{rest}"
        if match := EXPERT_NAME.match(name):
            prefix, expert, projection = match.group(1), int(match.group(2)), match.group(3)
            stacked = "w2" if projection == EXPERT_PROJECTIONS[2] else "w13"
            return f"{prefix}.{stacked}{match.group(4) or ''}", (expert, projection)
        packed, shard = packed_parameter(self.packed_modules, name)
        if packed != name and packed not in self._parameter_names and name in self._parameter_names:
            return name, None  # an FP8 projection left unpacked
        return packed, shard

    def checkpoint_skips(self, name: str) -> bool:
        """The multi-token-prediction layer(s) (`model.layers.61` in R1) sit past the decoder layers:
        all skipped without `mtp`, all but the first (and its copies of the embedding and head) with
        it; under expert parallelism, the other ranks' routed experts (and their FP8 scales)."""
        if (match := LAYER_NAME.match(name)) and int(match.group(1)) >= self.config.num_hidden_layers:
            first_mtp = int(match.group(1)) == self.config.num_hidden_layers
            if self.mtp is None or not first_mtp or match.group(2).startswith(MTP_SHARED):
                return True
        local = self._local_experts
        if local is not None and (match := EXPERT_NAME.match(name)) and int(match.group(2)) not in local:
            return True
        return super().checkpoint_skips(name)
