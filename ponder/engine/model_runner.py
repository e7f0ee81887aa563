"""Owns the weights and the KV cache; turns a scheduled step into tensors, runs it, samples.

Tensor parallelism (docs/architecture.md#tensor-parallelism), nano-vllm's process model: the engine
process is rank 0 and spawns ranks 1..N-1, each a `ModelRunner` on its rank waiting in `loop`.
Every step rank 0 sends the step's `StepPlan` (plain lists, pickled) down one pipe per worker,
all ranks run the forward, and only rank 0 gets the logits and samples. An idle worker waits on
its pipe, which has no timeout (an engine may idle for hours); the collectives inside a step do.
Rank 0 decides the KV block count and broadcasts it, so every rank's cache has the same blocks.

Dimension legend: T tokens in the step, B sequences, M blocks per sequence, V vocab, C block copies.
"""

from __future__ import annotations

import logging
import os
import weakref
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import torch
import torch.multiprocessing as mp

from ponder import kernels
from ponder.engine import distributed
from ponder.engine.checkpoint import keeps_fp8
from ponder.engine.config import EngineConfig, ModelConfig
from ponder.engine.errors import ConfigError, TensorParallelError
from ponder.engine.layers.attention import AttentionMetadata
from ponder.engine.layers.sampler import Sampler
from ponder.engine.loader import load_model
from ponder.engine.scheduler import ScheduledSequence
from ponder.engine.sequence import Sequence, SequenceStatus

logger = logging.getLogger("ponder.engine")

GiB = 1 << 30


@dataclass
class StepPlan:
    """One forward pass as plain lists: what rank 0 sends the other ranks (small, picklable). The
    model's pass, or with `draft_rows` the MTP layer's pass over those rows of the previous pass's
    hidden states (speculative decoding). `block_copies` are done first (copy on write of forked
    samples' shared blocks); a plan with copies only runs no forward."""

    input_ids: list[int] = field(default_factory=list)  # [T]
    positions: list[int] = field(default_factory=list)  # [T]
    query_lens: list[int] = field(default_factory=list)  # [B] new tokens per sequence, decodes first
    context_lens: list[int] = field(default_factory=list)  # [B]
    block_tables: list[list[int]] = field(default_factory=list)  # [B][M]
    num_decodes: int = 0
    logits_indices: list[int] = field(default_factory=list)  # [S]
    # Rank 0's bookkeeping (the other ranks ignore it): the scheduled item of each logits row, the
    # draft each row verifies (-1: none), the sample each row draws for (a forking item's rows draw
    # samples 0..n-1 from one hidden row; else 0), each scheduled item's first row in [T].
    sampled_items: list[int] = field(default_factory=list)  # [S]
    row_drafts: list[int] = field(default_factory=list)  # [S]
    row_samples: list[int] = field(default_factory=list)  # [S]
    item_rows: list[int] = field(default_factory=list)
    draft_rows: list[int] | None = None  # [T] MTP pass: the previous pass's hidden row of each token
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # [C] (source, destination) blocks

    def add(self, token_ids: list[int], start: int, block_table: list[int], one_token_rows: bool) -> int:
        """Append one sequence's tokens at positions start.. and return the first one's row: as one
        span (a prompt chunk over the cached prefix), or as one-token rows each attending up to its
        own position, so that the batched decode attention serves a decode and a sequence verifying
        drafts alike (vLLM's batch expansion). All rows come before the first span (decodes first)."""
        first, n = len(self.input_ids), len(token_ids)
        self.input_ids += token_ids
        self.positions += range(start, start + n)
        lengths = [(1, start + j + 1) for j in range(n)] if one_token_rows else [(n, start + n)]
        for query_len, context_len in lengths:
            self.query_lens.append(query_len)
            self.context_lens.append(context_len)
            self.block_tables.append(block_table)
        self.num_decodes += n if one_token_rows else 0
        return first


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states whose next token is sampled
    sampled_items: list[int]  # index into the step's scheduled list for each sampled row


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
        self.device = _rank_device(config.device, rank, self.world_size)
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
            self.workers, self.pipes = _spawn_workers(model_path, model_config, config, max_model_len, port)
            self._finalizer = weakref.finalize(self, _shutdown, self.workers, self.pipes, threads_before)
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
        self.last_plan: StepPlan | None = None  # the last main pass (rank 0; propose() reads its rows)
        self.hidden: torch.Tensor | None = None  # [T, E] of the last pass, kept for the MTP layer

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
        self.cache_layers = [m for m in self.model.modules() if hasattr(m, "kv_cache_shapes")]
        # Resident weight bytes of every rank (rank 0's view; one entry with one rank).
        self.rank_weight_bytes = self._gather(sum(p.numel() * p.element_size() for p in self.model.parameters()))
        self.num_blocks = self._allocate_kv_cache(max_model_len)

    def _gather(self, value: int) -> list[int]:
        if self.world_size == 1:
            return [value]
        return [b for b in distributed.gather_objects(value) or [] if isinstance(b, int)]

    # -- the other ranks --------------------------------------------------------------------
    def loop(self, pipe: Connection) -> None:
        """A worker rank: run each step rank 0 sends until it sends None or its end closes."""
        while True:
            try:
                plan = pipe.recv()
            except EOFError:  # rank 0 is gone
                return
            if plan is None:
                return
            self.run(plan)

    def check_workers(self) -> None:
        """Raise if a worker rank has exited (rank 0, before each step)."""
        for rank, worker in enumerate(self.workers, start=1):
            if not worker.is_alive():
                raise TensorParallelError(
                    f"tensor-parallel rank {rank} exited (code {worker.exitcode}); close this engine, start another"
                )

    def close(self) -> None:
        """Stop the worker ranks and leave the process group (rank 0; idempotent)."""
        if self._finalizer is not None:
            self._finalizer()

    # -- KV cache ---------------------------------------------------------------------------
    @property
    def kv_cache_bytes_per_token(self) -> int:
        per_token = sum(
            _numel(shape[2:]) for layer in self.cache_layers for shape in layer.kv_cache_shapes(1, 1).values()
        )
        return per_token * self.dtype.itemsize

    def _allocate_kv_cache(self, max_model_len: int) -> int:
        bytes_per_block = self.kv_cache_bytes_per_token * self.block_size
        # More blocks than max_num_seqs full-length sequences could never be used at once.
        useful = self.config.max_num_seqs * -(-max_model_len // self.block_size)
        num_blocks: object = None
        if self.rank == 0:
            num_blocks = self.config.num_kv_blocks or min(useful, self._kv_cache_budget() // bytes_per_block)
        if self.world_size > 1:  # rank 0's count everywhere: the block tables it sends index every cache
            num_blocks = distributed.broadcast_object(num_blocks)
        assert isinstance(num_blocks, int)
        if num_blocks < 1:
            raise ConfigError(f"KV cache budget holds no block (a block needs {bytes_per_block} bytes)")
        for layer in self.cache_layers:
            for name, shape in layer.kv_cache_shapes(num_blocks, self.block_size).items():
                # zeros, not empty: masked-out slots must never hold NaN (0 * NaN poisons attention)
                setattr(layer, name, torch.zeros(shape, dtype=self.dtype, device=self.device))
        logger.info(
            "KV cache: %d bytes/token, %d blocks x %d = %d tokens of capacity (%.2f GiB)",
            self.kv_cache_bytes_per_token,
            num_blocks,
            self.block_size,
            num_blocks * self.block_size,
            num_blocks * bytes_per_block / GiB,
        )
        return num_blocks

    def _kv_cache_budget(self) -> int:
        if self.config.kv_cache_memory:
            return self.config.kv_cache_memory
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * 0.9)
        return min(GiB, _available_memory() // 4)

    # -- a step -----------------------------------------------------------------------------
    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledSequence]) -> list[list[int]]:
        """Run one step; returns the new tokens per scheduled sequence: none mid-prefill, else the
        drafts that stood (speculative decoding) and then one token of the model's own; for a
        forking sequence, one first token per sample (sample 0's first)."""
        plan = self.last_plan = self.plan(scheduled)
        logits = self._forward(plan)
        if logits is None:
            return [[] for _ in scheduled]
        self.last_logits = logits
        seqs = [scheduled[i].seq for i in plan.sampled_items]
        positions = [plan.positions[row] + 1 for row in plan.logits_indices]  # of the tokens chosen
        streams = [seq.stream + sample for seq, sample in zip(seqs, plan.row_samples, strict=True)]
        tokens, accepted = self.sample(logits, seqs, plan.row_drafts, positions, streams)
        new_tokens: list[list[int]] = [[] for _ in scheduled]
        done: set[int] = set()
        rows = zip(plan.sampled_items, plan.row_samples, tokens.tolist(), accepted.tolist(), strict=True)
        for item, sample, token, draft_stood in rows:
            # An item's rows come in order: its drafts, then its bonus row; or a fork's samples 0..n-1.
            if item not in done or sample:
                new_tokens[item].append(token)
                if not draft_stood:
                    done.add(item)
        return new_tokens

    def copy_blocks(self, copies: list[tuple[int, int]]) -> None:
        """Copy whole KV blocks (source, destination) on every rank, in every cache layer."""
        if copies:
            self._forward(StepPlan(block_copies=copies))

    @torch.inference_mode()
    def propose(self, scheduled: list[ScheduledSequence]) -> None:
        """Speculative decoding's drafts for the step just run (after the scheduler's update): the
        MTP layer runs over every position the step computed and kept, each with the token after
        it, which fills its own cache there; the last row of each sequence that decodes next gives
        draft 1. Drafts 2..k run it one token further each, from its own last hidden state."""
        if not self.num_speculative_tokens or not scheduled or self.last_plan is None:
            return  # (no plan: the step was split to find a faulty request; no drafts this once)
        plan, drafting, positions = self._draft_plan(scheduled, self.last_plan.item_rows)
        for seq in drafting:
            seq.draft_token_ids = []
        for step in range(self.num_speculative_tokens):
            if not plan.input_ids:  # every sequence of the step finished, or none has a slot to draft in
                return
            logits = self._forward(plan)
            if logits is None:
                return
            for seq, token in zip(drafting, logits.argmax(dim=-1).tolist(), strict=True):
                seq.draft_token_ids.append(token)
            if step + 1 == self.num_speculative_tokens:
                return
            plan, drafting, positions = self._next_draft_plan(plan, drafting, positions)

    def _draft_plan(self, scheduled: list[ScheduledSequence], item_rows: list[int]) -> tuple[StepPlan, list, list[int]]:
        """The first MTP pass, and the sequences it drafts for with the position each drafts at."""
        order = sorted(range(len(scheduled)), key=lambda i: not _one_token_rows(scheduled[i]))  # decodes first
        rows: list[int] = []
        plan = StepPlan(draft_rows=rows)
        drafting, positions = [], []
        for i in order:
            item = scheduled[i]
            for seq, first, end in self._kept_spans(item):
                # The token after each position, and the model's hidden state at it.
                plan.add(seq.token_ids[first + 1 : end + 1], first, seq.block_table, _one_token_rows(item))
                rows += range(item_rows[i] + first - item.start, item_rows[i] + end - item.start)
                if seq.num_uncomputed_tokens == 1:  # decodes next step: draft for it
                    plan.logits_indices.append(len(plan.input_ids) - 1)
                    drafting.append(seq)
                    positions.append(end)
        return plan, drafting, positions

    def _kept_spans(self, item: ScheduledSequence) -> list[tuple[Sequence, int, int]]:
        """(sequence, first, end): the positions [first, end) of the step's hidden rows whose drafter
        entries each running sequence gets: the item's own sequence those the step computed and kept;
        each sample forked this step those from its own (copied) block of the last prompt position
        on, whose last entry depends on the sample's first token (the blocks before are shared)."""
        spans = []
        if item.seq.status is SequenceStatus.RUNNING and item.seq.num_computed_tokens > item.start:
            spans.append((item.seq, item.start, item.seq.num_computed_tokens))
        end = item.start + item.num_new_tokens  # a forking step verifies no drafts: it kept every token
        first = max(item.start, (end - 1) // self.block_size * self.block_size)
        spans += [(seq, first, end) for seq in item.forked if seq.status is SequenceStatus.RUNNING]
        return spans

    def _next_draft_plan(
        self, previous: StepPlan, drafting: list, positions: list[int]
    ) -> tuple[StepPlan, list, list[int]]:
        """One more draft token per sequence, at the next position, from the last draft and the MTP
        layer's own hidden state; a sequence without a cache slot there stops drafting."""
        rows: list[int] = []
        plan = StepPlan(draft_rows=rows)
        still, next_positions = [], []
        for seq, position, row in zip(drafting, positions, previous.logits_indices, strict=True):
            if position >= len(seq.block_table) * self.block_size:
                continue
            plan.add([seq.draft_token_ids[-1]], position, seq.block_table, one_token_rows=True)
            rows.append(row)
            plan.logits_indices.append(len(plan.input_ids) - 1)
            still.append(seq)
            next_positions.append(position + 1)
        return plan, still, next_positions

    def _forward(self, plan: StepPlan) -> torch.Tensor | None:
        return self._run_everywhere(plan) if self.world_size > 1 else self.run(plan)

    def _run_everywhere(self, plan: StepPlan) -> torch.Tensor | None:
        """Rank 0: send the plan, run its share; a dead or silent rank is a TensorParallelError."""
        self.check_workers()
        try:
            for pipe in self.pipes:
                pipe.send(plan)
            return self.run(plan)
        except (RuntimeError, OSError) as e:  # a closed pipe; gloo/nccl: a peer closed the connection or timed out
            self.check_workers()
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

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        return self.tensors(self.plan(scheduled))

    def plan(self, scheduled: list[ScheduledSequence]) -> StepPlan:
        # Decodes and draft verifications first, as one-token rows: one batched decode attention call.
        order = sorted(range(len(scheduled)), key=lambda i: not _one_token_rows(scheduled[i]))
        plan = StepPlan(item_rows=[0] * len(scheduled))
        for i in order:
            item = scheduled[i]
            seq, num_new, drafts, start = item.seq, item.num_new_tokens, item.draft_token_ids, item.start
            tokens = seq.token_ids[start : start + num_new] + drafts  # drafts: after the one uncomputed token
            plan.item_rows[i] = plan.add(tokens, start, seq.block_table, _one_token_rows(item))
            if item.completes:
                # The last token's row, and before it one row per draft it verifies; a fork samples
                # that row once more for each sample after the first.
                last = len(plan.input_ids) - 1
                forks = item.num_samples - 1
                plan.logits_indices += [*range(last - len(drafts), last + 1), *[last] * forks]
                plan.sampled_items += [i] * (len(drafts) + 1 + forks)
                plan.row_drafts += [*drafts, -1, *[-1] * forks]
                plan.row_samples += [*[0] * (len(drafts) + 1), *range(1, forks + 1)]
        return plan

    def tensors(self, plan: StepPlan) -> StepInputs:
        return StepInputs(
            input_ids=self._tensor(plan.input_ids),
            positions=self._tensor(plan.positions),
            meta=self._attention_metadata(
                plan.positions, plan.query_lens, plan.context_lens, plan.block_tables, plan.num_decodes
            ),
            logits_indices=self._tensor(plan.logits_indices),
            sampled_items=plan.sampled_items,
        )

    def _attention_metadata(
        self,
        positions: list[int],
        query_lens: list[int],
        context_lens: list[int],
        block_tables: list[list[int]],
        num_decodes: int,
    ) -> AttentionMetadata:
        tables = self._tensor(_pad(block_tables))  # [B, M]
        position_t = self._tensor(positions)  # [T]
        seq_index = torch.repeat_interleave(
            torch.arange(len(query_lens), device=self.device), self._tensor(query_lens)
        )  # [T]
        slot_mapping = tables[seq_index, position_t // self.block_size] * self.block_size
        slot_mapping += position_t % self.block_size
        prefill_lens = query_lens[num_decodes:]
        start_loc = [0]
        for n in prefill_lens:
            start_loc.append(start_loc[-1] + n)
        return AttentionMetadata(
            slot_mapping=slot_mapping,
            block_size=self.block_size,
            num_decode_tokens=num_decodes,
            decode_block_tables=self._tensor(_pad(block_tables[:num_decodes])),
            decode_context_lens=self._tensor(context_lens[:num_decodes]),
            prefill_block_tables=self._tensor(_pad(block_tables[num_decodes:])),
            prefill_query_start_loc=self._tensor(start_loc),
            prefill_context_lens=self._tensor(context_lens[num_decodes:]),
            max_prefill_query_len=max(prefill_lens, default=0),
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
            self._generator(seq.params.seed, stream, p) for seq, stream, p in zip(seqs, streams, positions, strict=True)
        ]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float, device=self.device)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float, device=self.device)
        top_ks = self._tensor([effective_top_k(p.top_k, logits.shape[1]) for p in params])
        drafts = self._tensor(row_drafts) if row_drafts else None
        return self.sampler(logits, temperatures, top_ps, top_ks, generators, self.shared_generator, drafts)

    def check_sampling(self, params) -> None:
        """Build one request's sampling tensors and generator as a step would, so that parameters
        the tensors cannot hold fail when the request is added, alone, not in a step with others."""
        torch.tensor([params.temperature, params.top_p], dtype=torch.float, device=self.device)
        self._tensor([effective_top_k(params.top_k, self.vocab_size)])
        if params.seed is not None:
            torch.Generator(self.device).manual_seed(params.seed)

    def _generator(self, seed: int | None, stream: int, position: int) -> torch.Generator | None:
        """A seeded sample's noise for the token at `position` comes from (seed, stream, position)
        alone: not from how many steps this process ran or which samples share the batch, so a job
        resumed elsewhere draws what it would have, and sample i of an n-request draws what an n=1
        request with sample_index=i does."""
        if seed is None:
            return None
        return torch.Generator(self.device).manual_seed(mix_seed(seed, stream, position))

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


def effective_top_k(top_k: int, vocab_size: int) -> int:
    """top_k as the sampler takes it: off (-1) and anything beyond the vocabulary mean all of it."""
    return min(top_k, vocab_size) if top_k > 0 else vocab_size


def mix_seed(seed: int, stream: int, position: int) -> int:
    """A 64-bit generator seed per (seed, random stream, token position): splitmix64 of (seed,
    position), where a stream s > 0 first replaces the seed by splitmix64 of (seed, s) on another
    increment. Stream 0 (a plain request, and sample 0) is the seed itself."""
    if stream:
        seed = _splitmix64(seed + stream * 0xD1B54A32D192ED03)
    return _splitmix64(seed + (position + 1) * 0x9E3779B97F4A7C15)


def _splitmix64(z: int) -> int:
    """splitmix64's output function of a 64-bit state (taken mod 2**64)."""
    z %= 1 << 64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % (1 << 64)
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % (1 << 64)
    return z ^ (z >> 31)


def _one_token_rows(item: ScheduledSequence) -> bool:
    """One token to compute besides any drafts it verifies: a decode (or a one-token chunk)."""
    return item.num_new_tokens - len(item.draft_token_ids) == 1


def _rank_device(device: str, rank: int, world_size: int) -> torch.device:
    """CUDA ranks take one GPU each (cuda:rank); CPU ranks share the CPU."""
    base = torch.device(device)
    if base.type == "cuda" and world_size > 1:
        return torch.device("cuda", rank)
    return base


def _spawn_workers(
    model_path: Path, model_config: ModelConfig, config: EngineConfig, max_model_len: int, port: int
) -> tuple[list[BaseProcess], list[Connection]]:
    """Start ranks 1..N-1, each with a pipe from rank 0, and wait until each runs `run_worker` (a
    spawn that fails on import, e.g. a script without `if __name__ == "__main__":`, is an error
    now, not a rendezvous timeout)."""
    context = mp.get_context("spawn")
    workers: list[BaseProcess] = []
    pipes: list[Connection] = []
    for rank in range(1, config.tensor_parallel_size):
        ours, theirs = context.Pipe()
        worker = context.Process(
            target=run_worker,
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
        ModelRunner(model_path, model_config, config, max_model_len, rank=rank, port=port).loop(pipe)
    finally:
        distributed.destroy_process_group()


def _shutdown(workers: list[BaseProcess], pipes: list[Connection], threads: int) -> None:
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


def _pad(rows: list[list[int]]) -> list[list[int]]:
    width = max((len(r) for r in rows), default=0)
    return [r + [0] * (width - len(r)) for r in rows]


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB
