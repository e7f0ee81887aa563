"""Tensor parallelism's processes, nano-vllm's model (docs/architecture.md#tensor-parallelism): the
engine process is rank 0 and spawns ranks 1..N-1, each a ModelRunner on its rank serving the
steps rank 0 sends down its pipe. An idle rank waits on its pipe, which has no timeout (an engine
may idle for hours); the collectives inside a step do."""

from __future__ import annotations

from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ponder.engine.config import EngineConfig, ModelConfig
from ponder.engine.errors import TensorParallelError
from ponder.engine.runtime import distributed
from ponder.engine.step_plan import StepPlan


def rank_device(device: str, rank: int, world_size: int) -> torch.device:
    """CUDA ranks take one GPU each (cuda:rank); CPU ranks share the CPU."""
    base = torch.device(device)
    if base.type == "cuda" and world_size > 1:
        return torch.device("cuda", rank)
    return base


def spawn_workers(
    target: Callable[..., None],
    model_path: Path,
    model_config: ModelConfig,
    config: EngineConfig,
    max_model_len: int,
    port: int,
) -> tuple[list[BaseProcess], list[Connection]]:
    """Start ranks 1..N-1, each running `target` (model_runner.py's run_worker) with a
    pipe from rank 0, and wait until each says it started (a spawn that fails on import, e.g. a
    script without `if __name__ == "__main__":`, is an error now, not a rendezvous timeout)."""
    context = mp.get_context("spawn")
    workers: list[BaseProcess] = []
    pipes: list[Connection] = []
    for rank in range(1, config.tensor_parallel_size):
        ours, theirs = context.Pipe()
        worker = context.Process(
            target=target,
            args=(rank, port, model_path, model_config, config, max_model_len, theirs),
            name=f"ponder-tp-rank-{rank}",
            daemon=True,
        )
        worker.start()
        theirs.close()
        workers.append(worker)
        pipes.append(ours)
    for rank, (started, pipe) in enumerate(zip(workers, pipes, strict=True), start=1):
        if pipe not in wait([pipe, started.sentinel], timeout=distributed.COLLECTIVE_TIMEOUT.total_seconds()):
            for w in workers:
                w.kill()
            raise TensorParallelError(
                f"tensor-parallel rank {rank} did not start (exit code {started.exitcode}); a script that builds a "
                'tensor-parallel engine needs `if __name__ == "__main__":` (spawned ranks import it)'
            )
        pipe.recv()  # the worker's "started"
    return workers, pipes


def serve_steps(run: Callable[[StepPlan], object], pipe: Connection) -> None:
    """A worker rank: run each step rank 0 sends until it sends None or its end closes."""
    while True:
        try:
            plan = pipe.recv()
        except EOFError:  # rank 0 is gone
            return
        if plan is None:
            return
        run(plan)


def check_workers(workers: list[BaseProcess]) -> None:
    """Raise if a worker rank has exited (rank 0, before each step)."""
    for rank, worker in enumerate(workers, start=1):
        if not worker.is_alive():
            raise TensorParallelError(
                f"tensor-parallel rank {rank} exited (code {worker.exitcode}); close this engine, start another"
            )


def shutdown(workers: list[BaseProcess], pipes: list[Connection], threads: int) -> None:
    """Rank 0's end of tensor parallelism: tell the workers to exit, wait (then kill), leave the
    group, give the process its thread count back. Runs once: from close(), when the runner is
    collected, or at interpreter exit."""
    for pipe in pipes:
        try:
            pipe.send(None)
        except OSError:
            pass  # that worker is gone already
        pipe.close()
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.kill()
            worker.join(timeout=5)
    distributed.destroy_process_group()
    torch.set_num_threads(threads)
