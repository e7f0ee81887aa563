"""Paged KV-cache bookkeeping: fixed-size blocks, ref counts, a free list and a prefix cache.

No torch: this decides which cache block holds which tokens; the model runner turns block
tables into slot indices. A full block is keyed by the chained hash (parent hash, its token ids),
so equal prefixes share blocks. Freed blocks keep their contents and stay findable until a fresh
allocation evicts them (oldest-freed first), which is what makes a later request's prefix hit.

The samples of a forked request (parallel sampling) share their parent's blocks by reference
count. A block with more than one holder is read-only: before a sequence writes into it, it gets a
fresh block of its own (`copy_on_write`), and the (source, destination) pair waits in
`pending_copies` until the model runner copies the K/V rows (`take_copies`). Invariants: a block
is in the free list exactly when its ref count is 0, and every sequence holding a block counts
once in it, so freeing every sequence frees every block exactly once.
"""

from __future__ import annotations

from ponder.engine.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "hash", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] | None = None


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Insertion-ordered: eviction takes from the front (least recently freed).
        self.free_block_ids: dict[int, None] = dict.fromkeys(range(num_blocks))
        self.cached_block_ids: dict[int, int] = {}  # chained hash -> block id
        self._block_hashes: dict[tuple[str, int], list[int]] = {}  # seq_id -> hashes of its full blocks
        self.pending_copies: list[tuple[int, int]] = []  # (source, destination) blocks to copy, in order
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of those, tokens found

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def allocate_cached_prefix(self, seq: Sequence) -> int:
        """Give a newly admitted sequence the cached blocks of its longest cached prefix; returns
        the number of tokens they hold. At least one token is always left to compute, because the
        step that computes it is the one that produces the next token's logits; so is every token
        whose log probability is still wanted, and the one before it (Sequence.reusable_prefix)."""
        assert not seq.block_table, "prefix lookup is for sequences without blocks"
        hashes: list[int] = []
        if self.enable_prefix_caching:
            parent: int | str | None = seq.cache_salt
            for tokens in self._full_blocks(seq.token_ids[: seq.reusable_prefix]):
                block_hash = hash((parent, tokens))
                block_id = self.cached_block_ids.get(block_hash)
                if block_id is None or self.blocks[block_id].token_ids != tokens:
                    break
                self._take(block_id)
                seq.block_table.append(block_id)
                hashes.append(block_hash)
                parent = block_hash
            self.prefix_queries += len(seq)
            self.prefix_hits += len(hashes) * self.block_size
        self._block_hashes[seq.seq_id] = hashes
        seq.num_computed_tokens = len(hashes) * self.block_size
        return seq.num_computed_tokens

    def ensure_slots(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow the block table to hold `num_tokens` tokens; False (and no change) if blocks run out."""
        needed = self.blocks_for(num_tokens) - len(seq.block_table)
        if needed > self.num_free_blocks:
            return False
        for _ in range(needed):
            seq.block_table.append(self._allocate_fresh())
        return True

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Publish blocks that are now full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        hashes = self._block_hashes.setdefault(seq.seq_id, [])
        num_full = seq.num_computed_tokens // self.block_size
        while len(hashes) < num_full:
            index = len(hashes)
            tokens = tuple(seq.token_ids[index * self.block_size : (index + 1) * self.block_size])
            block_hash = hash((hashes[-1] if hashes else seq.cache_salt, tokens))
            hashes.append(block_hash)
            block = self.blocks[seq.block_table[index]]
            if block.hash is None:
                block.hash, block.token_ids = block_hash, tokens
                self.cached_block_ids.setdefault(block_hash, block.block_id)

    def free(self, seq: Sequence) -> None:
        # The tail goes back first, so it is evicted before the (more shareable) head.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
        seq.block_table = []
        self._block_hashes.pop(seq.seq_id, None)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child holds every block of the parent too (its K/V so far, shared read-only)."""
        assert not child.block_table, "a forked sequence starts without blocks"
        for block_id in parent.block_table:
            self.blocks[block_id].ref_count += 1
        child.block_table = list(parent.block_table)
        self._block_hashes[child.seq_id] = list(self._block_hashes.get(parent.seq_id, []))

    def copy_on_write(self, seq: Sequence, position: int) -> bool:
        """Before `seq` writes at `position` and after: each block from the one holding `position`
        on that another sequence holds too is swapped for a fresh one, with a copy queued when the
        block holds computed tokens (a block past them holds nothing to keep). False (and no
        change) if too few blocks are free."""
        first = position // self.block_size
        shared = [j for j in range(first, len(seq.block_table)) if self.blocks[seq.block_table[j]].ref_count > 1]
        if len(shared) > self.num_free_blocks:
            return False
        for j in shared:
            source, copy = seq.block_table[j], self._allocate_fresh()
            self.blocks[source].ref_count -= 1  # still held by another sequence
            seq.block_table[j] = copy
            if j * self.block_size < seq.num_computed_tokens:
                self.pending_copies.append((source, copy))
        return True

    def take_copies(self) -> list[tuple[int, int]]:
        """The block copies queued since the last call, for the model runner to do (in order) before
        anything writes into the copies."""
        copies, self.pending_copies = self.pending_copies, []
        return copies

    def _full_blocks(self, token_ids: list[int]):
        for start in range(0, len(token_ids) - self.block_size + 1, self.block_size):
            yield tuple(token_ids[start : start + self.block_size])

    def _take(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        block.ref_count += 1

    def _allocate_fresh(self) -> int:
        block_id = next(iter(self.free_block_ids))
        del self.free_block_ids[block_id]
        block = self.blocks[block_id]
        if block.hash is not None and self.cached_block_ids.get(block.hash) == block_id:
            del self.cached_block_ids[block.hash]  # evicted: its contents are about to be overwritten
        block.hash, block.token_ids, block.ref_count = None, None, 1
        return block_id
