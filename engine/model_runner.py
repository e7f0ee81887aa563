"""Owns the weights and the KV cache; turns a scheduled step into tensors, runs it, samples.

Dimension legend: T tokens in the step, B sequences, M blocks per sequence, V vocab.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.config import EngineConfig, ModelConfig
from engine.errors import ConfigError
from engine.layers.attention import AttentionMetadata
from engine.layers.sampler import Sampler
from engine.loader import load_model
from engine.scheduler import ScheduledSequence

logger = logging.getLogger("ponder.engine")

GiB = 1 << 30


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # [S] rows of the hidden states whose next token is sampled
    sampled_items: list[int]  # index into the step's scheduled list for each sampled row


class ModelRunner:
    def __init__(self, model_path: Path, model_config: ModelConfig, config: EngineConfig, max_model_len: int) -> None:
        torch.set_num_threads(config.num_threads or os.cpu_count() or 1)
        self.config = config
        self.block_size = config.block_size
        self.device = torch.device(config.device)
        self.dtype = getattr(torch, config.dtype)
        self.vocab_size = model_config.vocab_size
        self.model = load_model(
            model_path, model_config, self.dtype, self.device, max_model_len, fp8_weights=config.fp8_weights
        )
        self.cache_layers = [m for m in self.model.modules() if hasattr(m, "kv_cache_shapes")]
        self.num_blocks = self._allocate_kv_cache(max_model_len)
        self.sampler = Sampler()
        self.shared_generator = torch.Generator(self.device).manual_seed(config.seed)
        self.generators: dict[str, torch.Generator] = {}  # per-request streams of seeded requests

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
        num_blocks = self.config.num_kv_blocks or min(useful, self._kv_cache_budget() // bytes_per_block)
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
    def execute(self, scheduled: list[ScheduledSequence]) -> list[int | None]:
        """Run one step; returns the sampled token per scheduled sequence (None mid-prefill)."""
        inputs = self.prepare(scheduled)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)  # [T, E]
        sampled: list[int | None] = [None] * len(scheduled)
        if not inputs.sampled_items:
            return sampled
        logits = self.model.compute_logits(hidden[inputs.logits_indices])  # [S, V]
        token_ids = self.sample(logits, [scheduled[i].seq for i in inputs.sampled_items])
        for item, token_id in zip(inputs.sampled_items, token_ids.tolist(), strict=True):
            sampled[item] = token_id
        return sampled

    def prepare(self, scheduled: list[ScheduledSequence]) -> StepInputs:
        # Decodes (one new token) first: the attention layer handles them as one batched call.
        order = sorted(range(len(scheduled)), key=lambda i: scheduled[i].num_new_tokens != 1)
        num_decodes = sum(1 for s in scheduled if s.num_new_tokens == 1)
        input_ids: list[int] = []
        positions: list[int] = []
        query_lens: list[int] = []
        context_lens: list[int] = []
        block_tables: list[list[int]] = []
        logits_indices: list[int] = []
        sampled_items: list[int] = []
        for i in order:
            seq, num_new = scheduled[i].seq, scheduled[i].num_new_tokens
            start = seq.num_computed_tokens
            input_ids += seq.token_ids[start : start + num_new]
            positions += range(start, start + num_new)
            query_lens.append(num_new)
            context_lens.append(start + num_new)
            block_tables.append(seq.block_table)
            if scheduled[i].completes:
                logits_indices.append(len(input_ids) - 1)
                sampled_items.append(i)
        return StepInputs(
            input_ids=self._tensor(input_ids),
            positions=self._tensor(positions),
            meta=self._attention_metadata(positions, query_lens, context_lens, block_tables, num_decodes),
            logits_indices=self._tensor(logits_indices),
            sampled_items=sampled_items,
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

    def sample(self, logits: torch.Tensor, seqs: list) -> torch.Tensor:
        params = [seq.params for seq in seqs]
        generators = [self._generator(seq) for seq in seqs]
        temperatures = torch.tensor([p.temperature for p in params], dtype=torch.float, device=self.device)
        top_ps = torch.tensor([p.top_p for p in params], dtype=torch.float, device=self.device)
        top_ks = self._tensor([p.top_k if p.top_k > 0 else logits.shape[1] for p in params])
        return self.sampler(logits, temperatures, top_ps, top_ks, generators, self.shared_generator)

    def _generator(self, seq) -> torch.Generator | None:
        if seq.params.seed is None:
            return None
        if seq.request_id not in self.generators:
            self.generators[seq.request_id] = torch.Generator(self.device).manual_seed(seq.params.seed)
        return self.generators[seq.request_id]

    def release(self, request_id: str) -> None:
        self.generators.pop(request_id, None)

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int64, device=self.device)


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
