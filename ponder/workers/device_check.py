"""`ponder worker`'s start-up check: the GPUs it is asked to use exist and can hold the model.

Before the engine loads (minutes for a large checkpoint), the worker asks torch how many CUDA
devices it sees and how much memory each has, and compares that with what the model needs on each
tensor-parallel rank: its weights split over the ranks plus the KV cache of one job of
max_model_len tokens. What is missing is said in one line (a ConfigError, which `ponder worker`
prints as `error: ...`).

The arithmetic (`model_needs`, `check_devices`) takes plain numbers and needs no torch; only
`torch_devices` asks torch. The numbers are a floor: activations, the CUDA context and the
allocator's slack come on top, and the engine sizes its KV cache from the memory left after loading.
"""

from __future__ import annotations

from dataclasses import dataclass

from ponder.engine.checkpoint import keeps_fp8
from ponder.engine.config import EngineConfig, ModelConfig
from ponder.engine.errors import ConfigError

GiB = 1024**3


@dataclass(frozen=True)
class DeviceNeeds:
    """What one tensor-parallel rank needs, in bytes."""

    tensor_parallel_size: int
    weight_bytes_per_rank: int  # the largest rank's share, as it will be held (FP8 when kept)
    kv_bytes_per_rank: int  # one job of max_model_len tokens, on one rank
    max_model_len: int
    fp8: bool

    @property
    def bytes_per_rank(self) -> int:
        return self.weight_bytes_per_rank + self.kv_bytes_per_rank


def model_needs(config: ModelConfig, engine: EngineConfig, tensor_parallel_size: int = 1) -> DeviceNeeds:
    """Weights per rank (ponder/engine/tools/model_size.py's `parallel_size`: each rank's share as the engine
    shards the model, replicated parts whole on every rank, at the engine's dtype or as the FP8
    checkpoint stores them; with the MTP layer when speculative decoding is on) and one max-length
    job's KV cache per rank. A model that does not split evenly is a ConfigError."""
    from ponder.engine.tools.model_size import DTYPE_BYTES
    from ponder.engine.tools.parallel_size import parallel_size

    fp8 = keeps_fp8(config.model_type, config.extra, engine.device.split(":")[0], engine.fp8_weights)
    max_model_len = engine.max_model_len or config.max_position_embeddings
    # Expert parallelism (whole routed experts per rank) changes the shares; one rank ignores it.
    ep = tensor_parallel_size > 1 and engine.enable_expert_parallel
    mtp = engine.speculative_tokens(config) > 0  # the drafter's layer and its cache
    shares = parallel_size(config, tensor_parallel_size, ep=ep, dtype_bytes=DTYPE_BYTES[engine.dtype], mtp=mtp)
    kept = shares.weight_bytes_fp8_per_gpu if fp8 else None
    weights = kept if kept is not None else shares.weight_bytes_per_gpu
    per_job = shares.kv_cache_bytes_per_token_per_gpu * max_model_len
    return DeviceNeeds(tensor_parallel_size, weights, per_job, max_model_len, kept is not None)


def check_devices(
    needs: DeviceNeeds,
    device: str,
    available_devices: int,
    device_memory_bytes: list[int],
    cuda_build: bool = True,
) -> None:
    """Raise a ConfigError saying what is missing when `device` ("cuda" or "cuda:N") with
    `needs.tensor_parallel_size` ranks (devices N .. N+size-1) cannot run: fewer devices than ranks
    (`check_device_count`), or a device whose memory (`device_memory_bytes[i]`, device i's total)
    holds less than one rank needs."""
    size = needs.tensor_parallel_size
    first = check_device_count(device, size, available_devices, cuda_build)
    short = [i for i in range(first, first + size) if device_memory_bytes[i] < needs.bytes_per_rank]
    if short:
        smallest = min(device_memory_bytes[i] for i in short)
        weights = f"{needs.weight_bytes_per_rank / GiB:.1f} GiB of weights" + (" (FP8)" if needs.fp8 else "")
        raise ConfigError(
            f"{_wanted(device, size)}: each GPU needs at least {needs.bytes_per_rank / GiB:.1f} GiB "
            f"({weights} + {needs.kv_bytes_per_rank / GiB:.1f} GiB of KV cache for one "
            f"{needs.max_model_len}-token job), but device{'s' if len(short) > 1 else ''} "
            f"{', '.join(map(str, short))} ha{'ve' if len(short) > 1 else 's'} {smallest / GiB:.1f} GiB: "
            "use more GPUs (PONDER_TENSOR_PARALLEL_SIZE), a smaller PONDER_MAX_MODEL_LEN or PONDER_DTYPE, "
            "or an FP8 checkpoint"
        )


def check_device_count(device: str, size: int, available_devices: int, cuda_build: bool = True) -> int:
    """The first device's index, or a ConfigError when torch sees fewer than `size` devices from it
    on. `cuda_build`: whether torch was built with CUDA at all (a CPU build sees no device)."""
    first = int(device.split(":", 1)[1]) if ":" in device else 0
    if available_devices == 0:
        why = (
            "this torch is a CPU build (install the CUDA build: docker/worker.Dockerfile)"
            if not cuda_build
            else "no GPU is visible (check the driver, nvidia-smi, and that the container was given GPUs)"
        )
        raise ConfigError(f"{_wanted(device, size)}: torch sees no CUDA device: {why}")
    if available_devices < first + size:
        raise ConfigError(
            f"{_wanted(device, size)} needs CUDA devices {first}..{first + size - 1}, but torch sees "
            f"{available_devices} (CUDA_VISIBLE_DEVICES and the container's GPU count decide how many)"
        )
    return first


def _wanted(device: str, size: int) -> str:
    return f"PONDER_DEVICE={device} with PONDER_TENSOR_PARALLEL_SIZE={size}"


def torch_devices() -> tuple[int, list[int], bool]:
    """(device count, each device's total memory in bytes, whether torch is a CUDA build), from torch.
    Total memory from the device properties: nothing is allocated on any device here."""
    import torch

    cuda_build = torch.version.cuda is not None
    if not torch.cuda.is_available():
        return 0, [], cuda_build
    count = torch.cuda.device_count()
    return count, [torch.cuda.get_device_properties(i).total_memory for i in range(count)], cuda_build


def check_worker_devices(model: str, engine: EngineConfig) -> None:
    """The start-up check for the settings' model and engine; nothing to check off CUDA."""
    if not engine.device.startswith("cuda"):
        return
    from ponder.engine.model_store import resolve_model

    size = engine.tensor_parallel_size
    count, memory, cuda_build = torch_devices()
    check_device_count(engine.device, size, count, cuda_build)  # before resolving (maybe fetching) the model
    needs = model_needs(ModelConfig.from_pretrained(resolve_model(model)), engine, size)
    check_devices(needs, engine.device, count, memory, cuda_build)
