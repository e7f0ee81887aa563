"""DeepSeek-V3 / R1 decoder: MLA attention over a paged latent cache, YaRN rope on the rope dims,
dense MLPs for the first `first_k_dense_replace` layers and DeepSeekMoE after.

Dimension legend: T tokens in the step, E hidden size, V vocab.
"""

from __future__ import annotations

import re

from torch import nn

from engine.config import ModelConfig
from engine.distributed import ep_enabled, local_experts
from engine.layers.mla import MLAAttention
from engine.layers.mlp import DenseMLP
from engine.layers.moe import EXPERT_PROJECTIONS, DeepseekMoE
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding, rope_frequencies, yarn_mscale
from engine.models.base import CausalLM, DecoderLayer, DecoderModel, packed_parameter

LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
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
        rotary = RotaryEmbedding(rope_dim, max_position, inv_freq, magnitude, interleaved)  # shared by all layers
        self.layers = nn.ModuleList(
            DeepseekV3DecoderLayer(config, i, rotary, fp8) for i in range(config.num_hidden_layers)
        )


class DeepseekV3ForCausalLM(CausalLM):
    packed_modules = {
        "q_a_proj": ("fused_qkv_a_proj", "q"),
        "q_proj": ("fused_qkv_a_proj", "q"),
        "kv_a_proj_with_mqa": ("fused_qkv_a_proj", "kv_a"),
        "gate_proj": ("gate_up_proj", "gate"),
        "up_proj": ("gate_up_proj", "up"),
    }

    supports_fp8_weights = True  # `fp8=True`: the official FP8 linears stay FP8 (docs/architecture.md#fp8-weights)

    def __init__(self, config: ModelConfig, max_position: int, fp8: bool = False) -> None:
        """With `fp8` every attention, MLP, expert and shared-expert linear holds float8_e4m3fn
        weights and their block scales, as the official checkpoints store them; embeddings, norms,
        the router and lm_head stay in the engine dtype. Projections whose FP8 scales cannot share
        a packed weight stay separate parameters under their checkpoint names."""
        super().__init__(config, DeepseekV3Model(config, max_position, fp8))
        self._parameter_names = {name for name, _ in self.named_parameters()}
        # Under expert parallelism, the routed experts this rank holds (global ids).
        self._local_experts = local_experts(int(config.extra.get("n_routed_experts") or 0)) if ep_enabled() else None

    def parameter_for(self, name: str) -> tuple[str, object]:
        """Checkpoint name -> (parameter, shard): per-expert tensors go to their slot of the stacked
        expert weights; projections to their packed parameter."""
        if match := EXPERT_NAME.match(name):
            prefix, expert, projection = match.group(1), int(match.group(2)), match.group(3)
            stacked = "w2" if projection == EXPERT_PROJECTIONS[2] else "w13"
            return f"{prefix}.{stacked}{match.group(4) or ''}", (expert, projection)
        packed, shard = packed_parameter(self.packed_modules, name)
        if packed != name and packed not in self._parameter_names and name in self._parameter_names:
            return name, None  # an FP8 projection left unpacked
        return packed, shard

    def checkpoint_skips(self, name: str) -> bool:
        """The multi-token-prediction layer(s) (`model.layers.61` in R1) sit past the decoder layers;
        under expert parallelism, the other ranks' routed experts (and their FP8 scales)."""
        if (match := LAYER_NAME.match(name)) and int(match.group(1)) >= self.config.num_hidden_layers:
            return True
        local = self._local_experts
        if local is not None and (match := EXPERT_NAME.match(name)) and int(match.group(2)) not in local:
            return True
        return super().checkpoint_skips(name)
