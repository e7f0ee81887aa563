"""The KV cache's size: bytes per token from the model's cache layers, the block count rank 0
picks from its memory budget (and every rank then uses), and the zeroed cache tensors."""

from __future__ import annotations

import logging
import math
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from ponder.engine.config import EngineConfig
from ponder.engine.errors import ConfigError
from ponder.engine.runtime import distributed

logger = logging.getLogger("ponder.engine")

GiB = 1 << 30


@runtime_checkable
class CacheLayer(Protocol):
    """A layer that holds cache tensors (PagedAttention: K and V; MLAAttention: the latent), each
    [num_blocks, block_size, ...], as attributes of these names."""

    def kv_cache_shapes(self, num_blocks: int, block_size: int) -> dict[str, tuple[int, ...]]: ...


def cache_layers(model: nn.Module) -> list[CacheLayer]:
    """The model's layers that hold a cache, the MTP layer's attention included."""
    return [m for m in model.modules() if isinstance(m, CacheLayer)]


def bytes_per_token(layers: list[CacheLayer], dtype: torch.dtype) -> int:
    per_token = sum(math.prod(shape[2:]) for layer in layers for shape in layer.kv_cache_shapes(1, 1).values())
    return per_token * dtype.itemsize


def block_count(config: EngineConfig, rank: int, device: torch.device, bytes_per_block: int, max_model_len: int) -> int:
    """Rank 0's count, broadcast to every rank: the block tables it sends index every cache."""
    # More blocks than max_num_seqs full-length sequences could never be used at once.
    useful = config.max_num_seqs * -(-max_model_len // config.block_size)
    num_blocks: object = None
    if rank == 0:
        num_blocks = config.num_kv_blocks or min(useful, _budget(config, device) // bytes_per_block)
    if config.tensor_parallel_size > 1:
        num_blocks = distributed.broadcast_object(num_blocks)
    assert isinstance(num_blocks, int)
    if num_blocks < 1:
        raise ConfigError(f"KV cache budget holds no block (a block needs {bytes_per_block} bytes)")
    return num_blocks


def allocate(layers: list[CacheLayer], num_blocks: int, config: EngineConfig, device: torch.device) -> None:
    dtype = getattr(torch, config.dtype)
    for layer in layers:
        for name, shape in layer.kv_cache_shapes(num_blocks, config.block_size).items():
            # zeros, not empty: masked-out slots must never hold NaN (0 * NaN poisons attention)
            setattr(layer, name, torch.zeros(shape, dtype=dtype, device=device))
    per_token = bytes_per_token(layers, dtype)
    logger.info(
        "KV cache: %d bytes/token, %d blocks x %d = %d tokens of capacity (%.2f GiB)",
        per_token,
        num_blocks,
        config.block_size,
        num_blocks * config.block_size,
        num_blocks * per_token * config.block_size / GiB,
    )


def _budget(config: EngineConfig, device: torch.device) -> int:
    if config.kv_cache_memory:
        return config.kv_cache_memory
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * 0.9)
    return min(GiB, _available_memory() // 4)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB
