"""Tensor parallelism: which rank this process is, the collectives the sharded layers call, and the
start-up checks that a model splits evenly over the ranks.

Invariants:
- World size 1 is the plain engine: no process group exists and every collective here returns its
  input untouched, so one rank runs exactly the code it ran before tensor parallelism.
- A layer reads `tp_rank()` / `tp_size()` / `ep_enabled()` once, when it is built (`ModelRunner`
  builds the model inside `parallel_state(rank, size, expert_parallel)`), and keeps them: a
  one-rank engine built while a tensor-parallel one lives in the same process stays one-rank.
- Expert parallelism spans the tensor-parallel ranks (EP size = TP size, as vLLM): with it on, rank r
  holds routed experts `local_experts(X)` whole instead of 1/N of every expert; one rank ignores it.
- Every rank runs the same layers in the same order, so every collective is entered by all ranks.
  Rank 0 owns the process group's lifetime (`ModelRunner.close`).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from ponder.engine.config import ModelConfig
from ponder.engine.errors import ConfigError

# How long a collective (or the start of a rank) waits for a silent peer before raising: a hung rank
# must not hang rank 0. Idle workers wait on their step pipe instead, without a timeout.
COLLECTIVE_TIMEOUT = timedelta(seconds=300)


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    size: int = 1
    expert_parallel: bool = False  # routed experts whole, X / size per rank (only when size > 1)


_state = ParallelState()


def tp_rank() -> int:
    return _state.rank


def tp_size() -> int:
    return _state.size


def ep_enabled() -> bool:
    """Whether routed experts are distributed whole over the ranks (never with one rank)."""
    return _state.expert_parallel and _state.size > 1


def local_experts(num_experts: int) -> range:
    """The routed experts (global ids) this rank holds: all of them, or under expert parallelism
    the rank's contiguous X / N (rank r: r*X/N .. (r+1)*X/N - 1, ponder/engine/tools/parallel_size.py's rule)."""
    if not ep_enabled():
        return range(num_experts)
    per_rank = num_experts // _state.size
    return range(_state.rank * per_rank, (_state.rank + 1) * per_rank)


@contextmanager
def parallel_state(rank: int, size: int, expert_parallel: bool = False) -> Iterator[None]:
    """Layers built inside this block shard themselves for `rank` of `size` (routed experts whole,
    X / size each, with `expert_parallel`)."""
    global _state
    previous, _state = _state, ParallelState(rank, size, expert_parallel)
    try:
        yield
    finally:
        _state = previous


def init_process_group(rank: int, size: int, port: int, device: torch.device) -> None:
    """Join the group of `size` ranks on this machine (gloo on CPU, nccl on CUDA)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device.index if device.index is not None else rank)
    dist.init_process_group(
        backend,
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=size,
        timeout=COLLECTIVE_TIMEOUT,
    )


def require_no_group() -> None:
    """One tensor-parallel engine per process: the process group is the process's default group."""
    if dist.is_initialized():
        raise ConfigError("a tensor-parallel engine already runs in this process; close it first (LLM.close())")


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    """A loopback port nobody listens on now, for the group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_reduce(x: torch.Tensor, size: int) -> torch.Tensor:
    """Sum `x` over the ranks in place (a no-op for one rank)."""
    if size > 1:
        dist.all_reduce(x)
    return x


def gather_last_dim(x: torch.Tensor, size: int) -> torch.Tensor | None:
    """Concatenate every rank's `x` along the last dim on rank 0; other ranks get None.
    x [..., N] -> [..., size * N]. One rank returns `x` as is."""
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)] if dist.get_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    return torch.cat(parts, dim=-1) if parts is not None else None


def broadcast_object(obj: object = None) -> object:
    """Rank 0's `obj` on every rank (pickled: keep it small)."""
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(obj: object) -> list[object] | None:
    """Every rank's `obj` on rank 0, in rank order; None elsewhere."""
    box: list[object] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, box, dst=0)
    return box


# -- start-up checks ------------------------------------------------------------------------


def kv_heads_per_rank(num_kv_heads: int, size: int) -> int:
    """KV heads each rank holds: an even share, or one replicated head when there are fewer heads
    than ranks."""
    return max(1, num_kv_heads // size)


def check_tensor_parallel(
    config: ModelConfig, size: int, fp8_kept: bool = False, expert_parallel: bool = False
) -> None:
    """Refuse, with a ConfigError naming the dimension, a model that does not split evenly over
    `size` ranks: attention heads, kv heads (or ranks a multiple of them, to replicate), vocab,
    MLP intermediate sizes, the routed experts' width (plain TP) or their count (`expert_parallel`:
    whole experts per rank; a model without routed experts is refused); with FP8 weights kept, each
    rank's slice in whole 128 blocks."""
    if size == 1:
        return  # expert parallelism over one rank is the plain engine (vLLM's no-op)
    extra = config.extra
    dims = {
        "num_attention_heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "intermediate_size": config.intermediate_size,
    }
    if config.attention_kind == "mha":
        kv = config.num_key_value_heads
        if kv % size and size % kv:
            raise ConfigError(
                f"tensor_parallel_size {size}: num_key_value_heads {kv} neither divides by it nor divides it"
            )
    moe = "moe_intermediate_size" in extra and bool(extra.get("n_routed_experts"))
    if expert_parallel and not moe:
        raise ConfigError(f"enable_expert_parallel needs a MoE model; {config.model_type} has no routed experts")
    if moe and expert_parallel:
        dims["n_routed_experts"] = int(extra["n_routed_experts"])
        dims["the shared experts' width"] = shared_experts_width(config)
    elif moe:
        dims["moe_intermediate_size"] = int(extra["moe_intermediate_size"])
    for name, value in dims.items():
        if value % size:
            suffix = " (expert parallel: whole routed experts per rank)" if name == "n_routed_experts" else ""
            raise ConfigError(f"tensor_parallel_size {size} does not divide {name} {value}{suffix}")
    if fp8_kept:
        _check_fp8_blocks(config, size, expert_parallel)


def shared_experts_width(config: ModelConfig) -> int:
    """moe_intermediate_size x n_shared_experts: the shared experts' MLP, TP-split in every mode."""
    extra = config.extra
    return int(extra["moe_intermediate_size"]) * int(extra.get("n_shared_experts") or 0)


def _check_fp8_blocks(config: ModelConfig, size: int, expert_parallel: bool = False) -> None:
    """FP8 weights shard with their block scales: each rank's rows (column-parallel) or columns
    (row-parallel) must be whole 128 blocks, or a block would be split between ranks. Under expert
    parallelism routed experts are whole (scales and all); only the shared experts are split."""
    from ponder.engine.runtime.fp8 import BLOCK_SIZE

    extra = config.extra
    heads = config.num_attention_heads // size
    qk = int(extra["qk_nope_head_dim"]) + int(extra["qk_rope_head_dim"])
    slices = {
        "q_b_proj rows": heads * qk,
        "kv_b_proj rows": heads * (int(extra["qk_nope_head_dim"]) + int(extra["v_head_dim"])),
        "o_proj columns": heads * int(extra["v_head_dim"]),
        "intermediate_size": config.intermediate_size // size,
    }
    if expert_parallel:
        slices["the shared experts' width"] = shared_experts_width(config) // size
    else:
        slices["moe_intermediate_size"] = int(extra["moe_intermediate_size"]) // size
    for name, value in slices.items():
        if value % BLOCK_SIZE:
            raise ConfigError(
                f"tensor_parallel_size {size} with FP8 weights kept: each rank's {name} ({value}) is not "
                f"a whole number of {BLOCK_SIZE}-wide scale blocks; use fp8_weights='dequantize'"
            )
