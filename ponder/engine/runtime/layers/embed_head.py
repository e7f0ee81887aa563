"""The vocab-parallel token embedding and LM head (docs/architecture.md#tensor-parallelism).

Each rank holds the rows of its vocab slice [rank * V / N, (rank + 1) * V / N). The embedding
looks up the ids in its slice, zeroes the others and all-reduces, so every rank gets every row;
the head computes its slice of the logits and gathers them on rank 0, the only rank that samples.
With one rank they are a plain embedding and a plain linear.

Dimension legend: T tokens, E hidden size, B sampled rows, V vocab, N ranks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ponder.engine.runtime.distributed import all_reduce, gather_last_dim, tp_rank, tp_size
from ponder.engine.runtime.layers.linear import ColumnParallelLinear, copy_checked, narrow_checked, set_weight_attrs


class VocabParallelEmbedding(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int) -> None:
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.num_embeddings = num_embeddings
        self.rows = num_embeddings // self.tp_size
        self.start = self.tp_rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, embedding_dim), requires_grad=False)  # [V / N, E]
        set_weight_attrs(self.weight, weight_loader=self.weight_loader)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard: object = None) -> None:
        if self.tp_size > 1:
            loaded = narrow_checked(loaded, 0, self.start, self.rows, self.num_embeddings)
        copy_checked(param.data, loaded)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)  # [T, E]
        local = input_ids - self.start  # [T]
        mine = (local >= 0) & (local < self.rows)
        x = F.embedding(local * mine, self.weight) * mine.unsqueeze(1).to(self.weight.dtype)  # [T, E]
        return all_reduce(x, self.tp_size)


class ParallelLMHead(ColumnParallelLinear):
    """logits = h W^T over the vocab; `logits()` returns them on rank 0 and None on the others."""

    def __init__(self, hidden_size: int, vocab_size: int) -> None:
        super().__init__(hidden_size, vocab_size)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        # hidden [B, E] -> [B, V / N] on each rank -> [B, V] on rank 0
        return gather_last_dim(self(hidden), self.tp_size)
