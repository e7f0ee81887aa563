"""DeepSeekMoE: a sigmoid router with group-limited top-k (`noaux_tc`), routed experts stored
stacked per layer, and always-on shared experts.

Tensor parallelism splits every routed expert along I (w13 column-, w2 row-parallel) and the
shared experts likewise; the routed and shared outputs are summed first, then all-reduced once.
The router is replicated. Expert parallelism (EngineConfig.enable_expert_parallel) instead gives
each rank X / N whole routed experts: every rank routes every token, computes only the pairs of
its own experts, and the same one all-reduce sums the ranks' partial outputs (and the shared
experts', still split along I).

Dimension legend: T tokens, E hidden size, X routed experts, I expert intermediate size (per
rank), k experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ponder import kernels
from ponder.engine.config import ModelConfig
from ponder.engine.errors import ModelLoadError
from ponder.engine.runtime.distributed import all_reduce, ep_enabled, local_experts, tp_rank, tp_size
from ponder.engine.runtime.fp8 import BLOCK_SIZE, FP8_DTYPE
from ponder.engine.runtime.layers.linear import copy_checked, narrow_checked, set_weight_attrs
from ponder.engine.runtime.layers.mlp import DenseMLP

EXPERT_PROJECTIONS = ("gate", "up", "down")


class GroupedTopKRouter(nn.Module):
    """s = sigmoid(x W_g) in fp32; choice by s + e_score_correction_bias within the best groups."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        extra = config.extra
        if extra.get("scoring_func", "sigmoid") != "sigmoid" or extra.get("topk_method", "noaux_tc") != "noaux_tc":
            raise ModelLoadError("deepseek_v3: only the sigmoid router with topk_method noaux_tc is supported")
        self.num_experts = int(extra["n_routed_experts"])
        self.top_k = int(extra["num_experts_per_tok"])
        self.num_groups = int(extra.get("n_group") or 1)
        self.topk_groups = int(extra.get("topk_group") or 1)
        self.renormalize = bool(extra.get("norm_topk_prob", True))
        self.scaling = float(extra.get("routed_scaling_factor", 1.0))
        if self.num_experts % self.num_groups or self.topk_groups > self.num_groups:
            raise ModelLoadError(
                f"deepseek_v3: {self.num_experts} experts do not split into n_group={self.num_groups} "
                f"groups with topk_group={self.topk_groups}"
            )
        # fp32 whatever the engine dtype: the checkpoint keeps them so, and near-ties decide routing.
        self.weight = nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=torch.float32), requires_grad=False
        )
        self.e_score_correction_bias = nn.Parameter(
            torch.zeros(self.num_experts, dtype=torch.float32), requires_grad=False
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = F.linear(x.float(), self.weight).sigmoid()  # [T, X]
        return kernels.grouped_topk(
            scores,
            self.e_score_correction_bias,
            self.top_k,
            self.num_groups,
            self.topk_groups,
            self.renormalize,
            self.scaling,
        )  # weights [T, k], ids [T, k]


class FusedExperts(nn.Module):
    """Every routed expert's gate|up [X, 2I, E] and down [X, E, I] in two stacked parameters.
    The checkpoint's per-expert tensors load into their slices; shard = (expert, projection).

    With `fp8=True` the stacked weights stay float8_e4m3fn beside fp32 block scales
    `w13_scale_inv` [X, 2*ceil(I/128), ceil(E/128)] (gate's block rows, then up's) and
    `w2_scale_inv` [X, ceil(E/128), ceil(I/128)], and `kernels.fused_moe_fp8` runs them (the fused
    Triton MoE in its FP8 mode on CUDA, the per-expert reference elsewhere).

    With N tensor-parallel ranks each holds I / N of every expert's intermediate rows (gate's and
    up's slice, down's columns): the output is a partial sum the caller all-reduces. With expert
    parallelism each holds `local_experts(X)` (X / N of them) whole instead, the stacked dim X
    counting only those; `expert_map` ([X] global id -> local id, -1 elsewhere) tells the kernels
    to run only their pairs, and the output is again a partial sum. Shards stay (global expert,
    projection); another rank's expert is never loaded here (the model's `checkpoint_skips`)."""

    expert_map: torch.Tensor | None  # a non-persistent buffer: [X] int64 under expert parallelism, else None

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, fp8: bool = False) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_experts = num_experts
        self.expert_parallel = ep_enabled()
        self.local_experts = local_experts(num_experts)  # global ids held here
        self.full_intermediate_size = intermediate_size
        if not self.expert_parallel:
            intermediate_size //= self.tp_size
        self.intermediate_size = intermediate_size
        self.fp8 = fp8
        dtype = FP8_DTYPE if fp8 else None
        num_local = len(self.local_experts)
        self.w13 = nn.Parameter(
            torch.empty(num_local, 2 * intermediate_size, hidden_size, dtype=dtype), requires_grad=False
        )
        self.w2 = nn.Parameter(torch.empty(num_local, hidden_size, intermediate_size, dtype=dtype), requires_grad=False)
        expert_map = None
        if self.expert_parallel:
            expert_map = torch.full((num_experts,), -1, dtype=torch.int64)
            expert_map[self.local_experts.start : self.local_experts.stop] = torch.arange(num_local)
        self.register_buffer("expert_map", expert_map, persistent=False)
        w13_shards = [(e, p) for e in self.local_experts for p in ("gate", "up")]
        w2_shards = [(e, "down") for e in self.local_experts]
        set_weight_attrs(self.w13, expected_shards=w13_shards)
        set_weight_attrs(self.w2, expected_shards=w2_shards)
        params = [self.w13, self.w2]
        self.w13_scale_inv: nn.Parameter | None = None  # both set exactly when fp8
        self.w2_scale_inv: nn.Parameter | None = None
        if fp8:
            inter_blocks, hidden_blocks = -(-intermediate_size // BLOCK_SIZE), -(-hidden_size // BLOCK_SIZE)
            self.w13_scale_inv = nn.Parameter(
                torch.empty(num_local, 2 * inter_blocks, hidden_blocks, dtype=torch.float32), requires_grad=False
            )
            self.w2_scale_inv = nn.Parameter(
                torch.empty(num_local, hidden_blocks, inter_blocks, dtype=torch.float32), requires_grad=False
            )
            set_weight_attrs(self.w13_scale_inv, expected_shards=w13_shards)
            set_weight_attrs(self.w2_scale_inv, expected_shards=w2_shards)
            params += [self.w13_scale_inv, self.w2_scale_inv]
        for param in params:
            set_weight_attrs(param, weight_loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: tuple[int, str]) -> None:
        expert, projection = shard
        if self.expert_parallel and expert not in self.local_experts and 0 <= expert < self.num_experts:
            return  # another rank's expert: the model's checkpoint_skips keeps these from being read
        if self.tp_size > 1 and not self.expert_parallel:
            loaded = self._rank_slice(param, loaded, projection)
        target = param.data[expert - self.local_experts.start]  # [2I, E] or [E, I] (or their block scales)
        if projection != "down":
            rows = target.shape[0] // 2
            target = target.narrow(0, 0 if projection == "gate" else rows, rows)
        copy_checked(target, loaded)

    def _rank_slice(self, param: nn.Parameter, loaded: torch.Tensor, projection: str) -> torch.Tensor:
        """This rank's I-slice of one expert's tensor: rows of gate/up, columns of down (FP8 scales
        by block; check_tensor_parallel refused slices that cut a block)."""
        start, size, full = self.tp_rank * self.intermediate_size, self.intermediate_size, self.full_intermediate_size
        if param is self.w13_scale_inv or param is self.w2_scale_inv:
            start, size, full = start // BLOCK_SIZE, -(-size // BLOCK_SIZE), -(-full // BLOCK_SIZE)
        return narrow_checked(loaded, 1 if projection == "down" else 0, start, size, full)

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.fp8:
            assert self.w13_scale_inv is not None and self.w2_scale_inv is not None  # fp8 experts have both
            weights = (self.w13, self.w13_scale_inv, self.w2, self.w2_scale_inv)
            if self.expert_map is None:  # one rank: the dispatch's plain seven-argument form
                return kernels.fused_moe_fp8(x, *weights, topk_weights, topk_ids)  # [T, E]
            return kernels.fused_moe_fp8(x, *weights, topk_weights, topk_ids, expert_map=self.expert_map)  # [T, E]
        return kernels.fused_moe(x, self.w13, self.w2, topk_weights, topk_ids, self.expert_map)  # [T, E]


class DeepseekMoE(nn.Module):
    def __init__(self, config: ModelConfig, fp8: bool = False) -> None:
        super().__init__()
        extra = config.extra
        intermediate = int(extra["moe_intermediate_size"])
        self.gate = GroupedTopKRouter(config)  # the router stays bf16/fp32 in FP8 checkpoints
        self.experts = FusedExperts(self.gate.num_experts, config.hidden_size, intermediate, fp8)
        num_shared = int(extra.get("n_shared_experts") or 0)
        self.shared_experts = (
            DenseMLP(config.hidden_size, intermediate * num_shared, fp8, reduce_results=False) if num_shared else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        topk_weights, topk_ids = self.gate(x)  # [T, k], [T, k]
        out = self.experts(x, topk_weights, topk_ids)  # [T, E], this rank's partial sum (I slice or experts)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return all_reduce(out, self.experts.tp_size)  # one all-reduce per MoE block
