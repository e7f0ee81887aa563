"""Owns the weights and the KV cache; turns a step's plan into tensors, runs it, samples.

Tensor parallelism (docs/architecture.md#tensor-parallelism): rank 0 (the engine's runner) sends
each step's `StepPlan` to the other ranks (ranks.py), all ranks run the forward, and only rank 0
gets the logits and samples. Rank 0 decides the KV block count and broadcasts it, so every rank's
cache has the same blocks (kv_cache.py). Speculative decoding's drafts come from drafter.py, seeded
draws' noise from seeding.py (all in ponder/engine/runtime/).

Dimension legend: T tokens in the step, E hidden size, V vocab, S sampled rows, C block copies.
"""

from __future__ import annotations

import os
import weakref
from concurrent.futures import wait
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch

from ponder import kernels
from ponder.engine.checkpoint import keeps_fp8
from ponder.engine.config import EngineConfig, ModelConfig
from ponder.engine.errors import TensorParallelError
from ponder.engine.outputs import TokenLogprob
from ponder.engine.runtime import distributed, kv_cache, ranks, seeding
from ponder.engine.runtime.constraint_masks import ConstraintMasks, disallow
from ponder.engine.runtime.drafter import MtpDrafter
from ponder.engine.runtime.layers.attention import AttentionMetadata
from ponder.engine.runtime.layers.logits_processors import apply_logits_processors
from ponder.engine.runtime.layers.sampler import Sampler, effective_top_k
from ponder.engine.runtime.loader import load_model
from ponder.engine.runtime.logprobs import sampled_logprobs, score_rows
from ponder.engine.scheduler import SampledTokens, ScheduledSequence
from ponder.engine.step_plan import StepPlan, plan_step


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states whose next token is sampled


class ModelRunner:
    """Rank 0 (`rank=0`, the engine's) or a worker rank (built by `run_worker`, which then loops).
    With one rank there is no process group, no worker and no collective."""

    def __init__(
        self,
        model_path: Path,
        model_config: ModelConfig,
        config: EngineConfig,
        max_model_len: int,
        rank: int = 0,
        port: int | None = None,
    ) -> None:
        self.world_size, self.rank = config.tensor_parallel_size, rank
        self.num_speculative_tokens = config.speculative_tokens(model_config)
        threads_before = torch.get_num_threads()
        # N ranks share the cores: each takes its share unless num_threads says otherwise.
        torch.set_num_threads(config.num_threads or max(1, (os.cpu_count() or 1) // self.world_size))
        self.config = config
        self.block_size = config.block_size
        self.device = ranks.rank_device(config.device, rank, self.world_size)
        self.dtype = getattr(torch, config.dtype)
        self.vocab_size = model_config.vocab_size
        self.workers: list[BaseProcess] = []
        self.pipes: list[Connection] = []  # rank 0's end of each worker's step pipe
        self._finalizer: weakref.finalize | None = None
        if self.world_size > 1 and rank == 0:
            fp8_kept = keeps_fp8(model_config.model_type, model_config.extra, self.device.type, config.fp8_weights)
            distributed.check_tensor_parallel(model_config, self.world_size, fp8_kept, config.enable_expert_parallel)
            distributed.require_no_group()
            port = distributed.free_port()
            self.workers, self.pipes = ranks.spawn_workers(
                run_worker, model_path, model_config, config, max_model_len, port
            )
            self._finalizer = weakref.finalize(self, ranks.shutdown, self.workers, self.pipes, threads_before)
        try:
            self._build(model_path, model_config, max_model_len, port)
        except BaseException:
            for worker in self.workers:  # they may be inside any start-up collective: no goodbye
                worker.kill()
            self.close()
            raise
        kernels.prepare(self.device)  # compiled before the first step, not inside it
        self.sampler = Sampler()
        self.shared_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.last_logits: torch.Tensor | None = None  # [S, V] of the last step that sampled (rank 0)
        self.last_scores: list[TokenLogprob] = []  # [R] of the last pass's score rows (rank 0)
        self.last_plan: StepPlan | None = None  # the last main pass (rank 0; propose() reads its rows)
        self.hidden: torch.Tensor | None = None  # [T, E] of the last pass, kept for the MTP layer
        self.drafter = MtpDrafter(self.forward, self.num_speculative_tokens, self.block_size)
        self.constraint_masks = ConstraintMasks(self.vocab_size)
        self.eos_token_ids: list[int] = []  # set by LLMEngine: min_tokens masks them

    def _build(self, model_path: Path, model_config: ModelConfig, max_model_len: int, port: int | None) -> None:
        """Join the group (several ranks), load this rank's weights, size the KV cache."""
        if self.world_size > 1:
            assert port is not None  # rank 0 picked it and gave it to the workers
            distributed.init_process_group(self.rank, self.world_size, port, self.device)
        with distributed.parallel_state(self.rank, self.world_size, self.config.enable_expert_parallel):
            self.model = load_model(
                model_path,
                model_config,
                self.dtype,
                self.device,
                max_model_len,
                fp8_weights=self.config.fp8_weights,
                mtp=self.num_speculative_tokens > 0,
            )
        self.cache_layers = kv_cache.cache_layers(self.model)
        # Resident weight bytes of every rank (rank 0's view; one entry with one rank).
        self.rank_weight_bytes = self._gather(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        self.kv_cache_bytes_per_token = kv_cache.bytes_per_token(self.cache_layers, self.dtype)
        bytes_per_block = self.kv_cache_bytes_per_token * self.block_size
        self.num_blocks = kv_cache.block_count(self.config, self.rank, self.device, bytes_per_block, max_model_len)
        kv_cache.allocate(self.cache_layers, self.num_blocks, self.config, self.device)

    def _gather(self, value: int) -> list[int]:
        if self.world_size == 1:
            return [value]
        return [b for b in distributed.gather_objects(value) or [] if isinstance(b, int)]

    def close(self) -> None:
        """Stop the worker ranks and leave the process group (rank 0; idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    # -- a step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> list[SampledTokens]:
        """Run one step; returns per scheduled sequence its new tokens (none mid-prefill; the drafts
        that stood, then one of the model's own; a fork's first token per sample, sample 0's first),
        with their log probabilities and those of known tokens it scored, where wanted."""
        plan = self.last_plan = plan_step(scheduled)
        seqs = [scheduled[i].seq for i in plan.sampled_items]
        masks = self.constraint_masks.start(seqs, plan.row_drafts)  # computed while the forward runs
        try:
            logits = self.forward(plan)
        finally:
            wait([masks])  # whatever the forward did: the next step's masks must not overlap these
        results = [SampledTokens() for _ in scheduled]
        for item, position, score in zip(plan.score_items, plan.score_positions, self.last_scores, strict=True):
            results[item].scored.append((position, score))
        if logits is None:
            return results
        self.last_logits = logits
        positions = [plan.positions[row] + 1 for row in plan.logits_indices]  # of the tokens chosen
        streams = [seq.stream + sample for seq, sample in zip(seqs, plan.row_samples, strict=True)]
        if (bitmask := masks.result()) is not None:  # [S, ceil(V/32)]: the tokens each row may take
            logits = disallow(logits, bitmask)
        logits = apply_logits_processors(logits, seqs, plan.sampled_items, plan.row_drafts, self.eos_token_ids)
        tokens, accepted = self.sample(logits, seqs, plan.row_drafts, positions, streams)
        values = sampled_logprobs(self.last_logits, tokens, [seq.params.logprobs for seq in seqs])
        done: set[int] = set()
        rows = zip(plan.sampled_items, plan.row_samples, tokens.tolist(), accepted.tolist(), values, strict=True)
        for item, sample, token, draft_stood, value in rows:
            # An item's rows come in order: its drafts, then its bonus row; or a fork's samples 0..n-1.
            if item not in done or sample:
                results[item].token_ids.append(token)
                results[item].logprobs += [value] if value is not None else []
                if not draft_stood:
                    done.add(item)
        return results

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (source, destination) on every rank, in every cache layer."""
        if copies:
            self.forward(StepPlan(block_copies=copies))

    def propose(self, scheduled: list[ScheduledSequence]) -> None:
        """Speculative decoding's drafts for the step just run (ponder/engine/runtime/drafter.py)."""
        self.drafter.propose(scheduled, self.last_plan)

    def forward(self, plan: StepPlan) -> torch.Tensor | None:
        return self._run_everywhere(plan) if self.world_size > 1 else self.run(plan)

    def _run_everywhere(self, plan: StepPlan) -> torch.Tensor | None:
        """Rank 0: send the plan, run its share; a dead or silent rank is a TensorParallelError."""
        ranks.check_workers(self.workers)
        try:
            for pipe in self.pipes:
                pipe.send(plan)
            return self.run(plan)
        except (RuntimeError, OSError) as e:  # a closed pipe; gloo/nccl: a peer closed the connection or timed out
            ranks.check_workers(self.workers)
            raise TensorParallelError(f"tensor-parallel step failed: {e}") from e

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """The forward of one step on this rank: the logits [S, V] on rank 0, None elsewhere or
        when nothing is sampled."""
        if plan.block_copies:
            self._copy_blocks(plan.block_copies)
        if not plan.input_ids:
            return None
        inputs = self.tensors(plan)
        if plan.draft_rows is None:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)  # [T, E]
            compute_logits = self.model.compute_logits
        else:
            assert self.hidden is not None, "an MTP pass follows a pass that kept its hidden states"
            previous = self.hidden[self._tensor(plan.draft_rows)]  # [T, E]
            hidden = self.model.propose(inputs.input_ids, inputs.positions, previous, inputs.meta)
            compute_logits = self.model.compute_draft_logits
        if self.num_speculative_tokens:
            self.hidden = hidden
        args = (plan.score_rows, plan.score_token_ids, plan.score_ks, compute_logits, self.vocab_size)
        self.last_scores = score_rows(hidden, *args) if plan.score_rows else []
        if not plan.logits_indices:
            return None
        return compute_logits(hidden[inputs.logits_indices])  # [S, V]

    def _copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Each destination block gets the source block's rows, in every cache tensor of every layer
        (K and V, or MLA's latent; the MTP layer's too). All reads happen before any write."""
        source = self._tensor([s for s, _ in copies])  # [C]
        destination = self._tensor([d for _, d in copies])  # [C]
        for layer in self.cache_layers:
            for name in layer.kv_cache_shapes(1, 1):
                cache = getattr(layer, name)  # [num_blocks, block_size, ...]
                cache[destination] = cache[source]

    def tensors(self, plan: StepPlan) -> StepInputs:
        meta = AttentionMetadata.of(
            plan.positions,
            plan.query_lens,
            plan.context_lens,
            plan.block_tables,
            plan.num_decodes,
            self.block_size,
            self.device,
        )
        return StepInputs(
            input_ids=self._tensor(plan.input_ids),
            positions=self._tensor(plan.positions),
            meta=meta,
            logits_indices=self._tensor(plan.logits_indices),
        )

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list,
        row_drafts: list[int] | None = None,
        row_positions: list[int] | None = None,
        row_streams: list[int] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (tokens [S], accepted [S]) for logits rows [S, V] of `seqs`, each row verifying its draft
        in `row_drafts` (-1 or absent: none), choosing the token at `row_positions` (absent: the
        one after each sequence's last) from the random stream in `row_streams` (absent: each
        sequence's own)."""
        params = [seq.params for seq in seqs]
        positions = row_positions or [len(seq) for seq in seqs]
        streams = row_streams or [seq.stream for seq in seqs]
        generators = [
            seeding.generator(self.device, seq.params.seed, stream, p)
            for seq, stream, p in zip(seqs, streams, positions, strict=True)
        ]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float, device=self.device)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float, device=self.device)
        top_ks = self._tensor([effective_top_k(p.top_k, logits.shape[1]) for p in params])
        drafts = self._tensor(row_drafts) if row_drafts else None
        min_ps = torch.tensor([p.min_p for p in params], device=self.device) if any(p.min_p for p in params) else None
        return self.sampler(logits, temperatures, top_ps, top_ks, generators, self.shared_generator, drafts, min_ps)

    def check_sampling(self, params) -> None:
        """Build one request's sampling tensors and generator as a step would, so that parameters
        the tensors cannot hold fail when the request is added, alone, not in a step with others."""
        torch.tensor([params.temperature, params.top_p], dtype=torch.float, device=self.device)
        self._tensor([effective_top_k(params.top_k, self.vocab_size)])
        if params.seed is not None:
            torch.Generator(self.device).manual_seed(params.seed)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def run_worker(
    rank: int,
    port: int,
    model_path: Path,
    model_config: ModelConfig,
    config: EngineConfig,
    max_model_len: int,
    pipe: Connection,
) -> None:
    """A worker rank's process: say it started, build its ModelRunner, run steps until rank 0 says exit."""
    pipe.send(rank)
    try:
        ranks.serve_steps(ModelRunner(model_path, model_config, config, max_model_len, rank=rank, port=port).run, pipe)
    finally:
        distributed.destroy_process_group()
