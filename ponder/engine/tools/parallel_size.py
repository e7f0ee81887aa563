"""A model's weights and KV cache per GPU under tensor (and expert) parallelism, from its config
alone, and how many jobs fit (docs/architecture.md#tensor-parallelism).

How the engine shards a model over N GPUs (one TP group; expert parallel, when on, spans the same
N GPUs, as vLLM's EP size = TP size):
- column-parallel linears (q_proj/k_proj/v_proj, MLA q_b_proj/q_proj and kv_b_proj, MLP gate_proj
  and up_proj) split their output rows over N; row-parallel linears (o_proj, down_proj) split
  their input columns; the embedding and LM head are vocab-parallel (rows over N);
- GQA: query heads split; KV heads split too, or replicated when there are fewer than N (each
  rank holds one, N / kv_heads ranks share it);
- MLA: q_a_proj, kv_a_proj_with_mqa and the norms replicated; the latent KV cache is replicated
  on every rank (each rank attends with its own heads over the whole latent);
- MoE: routed experts split along moe_intermediate_size (plain TP), or, with expert parallel,
  whole experts n_routed_experts / N per rank (rank r holds experts r*E/N .. (r+1)*E/N - 1);
  shared experts and dense MLPs TP-split; router weight and bias replicated;
- biases follow their weight's output dim (a row-parallel bias is replicated).
Weight bytes per GPU are what the engine keeps: FP8 with its block scales (counted on each shard)
for an FP8 checkpoint, else every weight at the dtype asked for. Activations, CUDA graphs and the
runtime's own memory are not counted.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ponder.engine.checkpoint import fp8_block_size, is_fp8_checkpoint
from ponder.engine.config import ModelConfig
from ponder.engine.errors import ConfigError, ModelLoadError
from ponder.engine.tools.checkpoint_tensors import Tensor, is_moe_layer, loaded_mtp_tensors, main_tensors, stored_bytes


@dataclass(frozen=True)
class Placement:
    """Where one checkpoint tensor lies on the N ranks: `dim` split into `parts` equal pieces (each
    piece on N / parts ranks), or replicated (dim None), or, for an EP routed expert, the whole
    tensor on rank `owner` alone."""

    dim: int | None = None
    parts: int = 1
    owner: int | None = None

    def shard(self, t: Tensor) -> Tensor:
        """The piece of `t` one rank holding it stores."""
        if self.dim is None:
            return t
        shape = list(t.shape)
        shape[self.dim] //= self.parts
        return Tensor(t.name, tuple(shape), t.kind)


REPLICATED = Placement()


@dataclass(frozen=True)
class ParallelSize:
    """A model's weights and KV cache per GPU under tensor parallel over `tp` GPUs (and expert
    parallel over the same GPUs when `ep`). The main model, plus the first MTP layer when `mtp` (the
    engine loads it for speculative decoding: without its embedding and head copies)."""

    tp: int
    ep: bool
    weight_bytes_per_gpu: int  # every weight at the dtype asked for (largest rank)
    weight_bytes_fp8_per_gpu: int | None  # as an FP8 checkpoint is kept (largest rank)
    replicated_bytes_per_gpu: int  # the part of weight_bytes_per_gpu that every rank holds whole
    replicated_bytes_fp8_per_gpu: int | None
    kv_cache_bytes_per_token_per_gpu: int
    routed_experts_per_gpu: int | None  # under EP; None without EP or without MoE
    mtp: bool = False  # the MTP layer (speculative decoding's drafter) and its cache counted

    @property
    def loaded_weight_bytes_per_gpu(self) -> int:
        """What a GPU holds: the FP8 figure for an FP8 checkpoint, else the dtype figure."""
        fp8 = self.weight_bytes_fp8_per_gpu
        return fp8 if fp8 is not None else self.weight_bytes_per_gpu


@dataclass(frozen=True)
class MemoryPlan:
    """How many jobs of `context` tokens fit per GPU: the KV budget is gpu_memory x utilization
    minus the weights (vLLM's gpu_memory_utilization, less activations, which are not counted);
    every rank of a TP group caches every job, so this is also the group's count."""

    gpu_memory_bytes: int
    gpu_utilization: float
    weight_bytes_per_gpu: int
    free_bytes_per_gpu: int  # gpu_memory - weights
    kv_budget_bytes_per_gpu: int  # int(gpu_memory * utilization) - weights
    context_tokens: int
    kv_cache_bytes_per_job_per_gpu: int
    jobs: int


def check_parallel(config: ModelConfig, tp: int, ep: bool = False) -> None:
    """A ConfigError unless `tp` GPUs can split the model evenly: heads, KV heads (or tp a multiple
    of them), vocab, MLP widths, and the routed experts (EP) or their width (plain TP)."""
    if tp < 1:
        raise ConfigError(f"tensor parallel size must be >= 1, got {tp}")
    x, moe = config.extra, config.model_type == "deepseek_v3"
    if ep and not moe:
        raise ConfigError(f"--ep (expert parallel) needs a MoE model; {config.model_type} has no experts")
    need = {"vocab_size": config.vocab_size, "num_attention_heads": config.num_attention_heads}
    if config.attention_kind != "mla":
        kv = config.num_key_value_heads
        if kv >= tp and kv % tp or kv < tp and tp % kv:
            raise ConfigError(f"tp={tp} must divide num_key_value_heads={kv} or be a multiple of it")
    if any(not is_moe_layer(config, i) for i in range(config.num_hidden_layers)):
        need["intermediate_size"] = config.intermediate_size
    if moe:
        if ep:
            need["n_routed_experts"] = int(x["n_routed_experts"])
        else:
            need["moe_intermediate_size"] = int(x["moe_intermediate_size"])
        if int(x.get("n_shared_experts") or 0):
            need["moe_intermediate_size x n_shared_experts"] = int(x["moe_intermediate_size"]) * int(
                x["n_shared_experts"]
            )
    for name, value in need.items():
        if value % tp:
            raise ConfigError(f"tp={tp} does not divide {name}={value}")


def placement(config: ModelConfig, name: str, tp: int, ep: bool = False) -> Placement:
    """The rule for one tensor of main_tensors / mtp_tensors (by its checkpoint name)."""
    leaf = name.rsplit(".", 1)[-1]  # weight, bias, e_score_correction_bias
    module = name[: -len(leaf) - 1]
    part = module.rsplit(".", 1)[-1]
    if ".mlp.experts." in name:
        if ep:
            experts = int(config.extra["n_routed_experts"])
            expert = int(module.split(".mlp.experts.", 1)[1].split(".", 1)[0])
            return Placement(owner=expert // (experts // tp))
        return _mlp_placement(part, tp)
    if part in ("gate_proj", "up_proj", "down_proj"):  # dense MLP, shared experts
        return _mlp_placement(part, tp)
    if part in ("embed_tokens", "lm_head", "head"):  # vocab-parallel embedding and LM head (MTP's too)
        return Placement(0, tp)
    if part in ("q_proj", "q_b_proj", "kv_b_proj"):
        return Placement(0, tp)
    if part in ("k_proj", "v_proj"):
        return Placement(0, min(tp, config.num_key_value_heads))
    if part == "o_proj":
        return Placement(1, tp) if leaf == "weight" else REPLICATED
    if part in ("q_a_proj", "kv_a_proj_with_mqa", "gate", "eh_proj") or "norm" in part:
        return REPLICATED
    raise ValueError(f"no tensor-parallel rule for {name}")


def _mlp_placement(part: str, tp: int) -> Placement:
    return Placement(1, tp) if part == "down_proj" else Placement(0, tp)


def kv_cache_bytes_per_token_per_gpu(config: ModelConfig, tp: int, dtype_bytes: int = 2) -> int:
    """GQA: max(1, kv_heads / tp) heads x head_dim x 2 (K and V) x layers x bytes on each rank.
    MLA: the whole latent (kv_lora_rank + qk_rope_head_dim) x layers x bytes, replicated on every rank."""
    if config.attention_kind == "mla":
        return config.kv_cache_bytes_per_token(dtype_bytes)
    heads = max(1, config.num_key_value_heads // tp)
    return 2 * heads * config.head_dim * config.num_hidden_layers * dtype_bytes


def rank_bytes(
    config: ModelConfig, tensors: list[Tensor], tp: int, ep: bool, dtype_bytes: int, fp8_block: tuple[int, int] | None
) -> tuple[list[int], int]:
    """Weight bytes on each of the tp ranks, and the replicated part every rank holds."""
    common = replicated = 0
    own = [0] * tp
    for t in tensors:
        where = placement(config, t.name, tp, ep)
        n = stored_bytes([where.shard(t)], dtype_bytes, fp8_block)
        if where.owner is not None:
            own[where.owner] += n
        else:
            common += n
            replicated += n if where.dim is None else 0
    return [common + o for o in own], replicated


def parallel_size(
    config: ModelConfig, tp: int, ep: bool = False, dtype_bytes: int = 2, mtp: bool = False
) -> ParallelSize:
    """Per-GPU weight and KV bytes of the main model on `tp` GPUs (see the rules above), with the
    speculative drafter when `mtp`. A ConfigError when tp does not split the model evenly; an
    incomplete config is a ModelLoadError."""
    check_parallel(config, tp, ep)
    try:
        main = list(main_tensors(config)) + (loaded_mtp_tensors(config) if mtp else [])
        block = fp8_block_size(config.extra) if is_fp8_checkpoint(config.extra) else None
        ranks, replicated = rank_bytes(config, main, tp, ep, dtype_bytes, None)
        fp8_ranks, fp8_replicated = rank_bytes(config, main, tp, ep, 2, block) if block else (None, None)
        experts = int(config.extra["n_routed_experts"]) // tp if ep else None
    except (KeyError, TypeError) as e:
        raise ModelLoadError(f"{config.model_type} config: missing or invalid field {e}") from e
    return ParallelSize(
        tp=tp,
        ep=ep,
        weight_bytes_per_gpu=max(ranks),
        weight_bytes_fp8_per_gpu=max(fp8_ranks) if fp8_ranks else None,
        replicated_bytes_per_gpu=replicated,
        replicated_bytes_fp8_per_gpu=fp8_replicated,
        kv_cache_bytes_per_token_per_gpu=kv_cache_bytes_per_token_per_gpu(config, tp, dtype_bytes)
        * (config.num_hidden_layers + (1 if mtp else 0))
        // config.num_hidden_layers,
        routed_experts_per_gpu=experts,
        mtp=mtp,
    )


def memory_plan(
    parallel: ParallelSize, gpu_memory_bytes: int, gpu_utilization: float = 0.9, context: int = 131072
) -> MemoryPlan:
    """Free bytes per GPU after the weights and how many `context`-token jobs the KV budget
    (gpu_memory x utilization - weights) holds; a ConfigError when the weights alone do not fit it."""
    if gpu_memory_bytes <= 0:
        raise ConfigError(f"GPU memory must be > 0 bytes, got {gpu_memory_bytes}")
    if not 0 < gpu_utilization <= 1:
        raise ConfigError(f"GPU utilization must be in (0, 1], got {gpu_utilization}")
    if context < 1:
        raise ConfigError("context must be >= 1")
    weights = parallel.loaded_weight_bytes_per_gpu
    budget = int(gpu_memory_bytes * gpu_utilization)
    if weights >= budget:
        raise ConfigError(
            f"weights alone do not fit: {weights:,} bytes per GPU at tp={parallel.tp} > "
            f"{budget:,} ({gpu_memory_bytes:,} x {gpu_utilization:g}); use more GPUs"
        )
    per_job = parallel.kv_cache_bytes_per_token_per_gpu * context
    return MemoryPlan(
        gpu_memory_bytes=gpu_memory_bytes,
        gpu_utilization=gpu_utilization,
        weight_bytes_per_gpu=weights,
        free_bytes_per_gpu=gpu_memory_bytes - weights,
        kv_budget_bytes_per_gpu=budget - weights,
        context_tokens=context,
        kv_cache_bytes_per_job_per_gpu=per_job,
        jobs=(budget - weights) // per_job,
    )


_UNITS = {"": 1, "B": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}


def parse_memory_size(text: str) -> int:
    """Bytes from "141GB", "141G", "80GiB", "1.5TB" or plain "150000000000": K/M/G/T and KB/MB/GB/TB
    are powers of 1000, KiB/MiB/GiB/TiB powers of 1024 (case-insensitive). A ConfigError otherwise."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)(b?)\s*", text, re.IGNORECASE)
    if not m or (m.group(3) and not m.group(2)):
        raise ConfigError(f"not a memory size: {text!r} (e.g. 141GB, 80GiB, 150000000000)")
    number, prefix, binary = m.group(1), m.group(2).upper(), bool(m.group(3))
    scale = 1024 ** "KMGT".index(prefix) * 1024 if binary else _UNITS[prefix]
    return int(float(number) * scale) if "." in number else int(number) * scale
