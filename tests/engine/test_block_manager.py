"""Paged KV bookkeeping: allocation, ref counts, the free list and the prefix cache."""

from ponder.engine.block_manager import BlockManager
from ponder.engine.config import SamplingParams
from ponder.engine.sequence import Sequence


def seq(request_id: str, tokens: list[int]) -> Sequence:
    return Sequence(request_id, tokens, SamplingParams())


def compute_all(bm: BlockManager, s: Sequence) -> None:
    assert bm.ensure_slots(s, len(s))
    s.num_computed_tokens = len(s)
    bm.commit_full_blocks(s)


def test_allocation_grows_by_block_and_fails_cleanly():
    bm = BlockManager(num_blocks=4, block_size=8)
    s = seq("a", list(range(20)))
    assert bm.ensure_slots(s, 20)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1
    assert bm.ensure_slots(s, 24)  # still fits in 3 blocks
    assert len(s.block_table) == 3
    big = seq("b", list(range(100, 120)))
    assert not bm.ensure_slots(big, 20)  # needs 3, one free
    assert big.block_table == [] and bm.num_free_blocks == 1  # nothing half-allocated


def test_prefix_hit_shares_blocks_and_counts_tokens():
    bm = BlockManager(num_blocks=16, block_size=8)
    first = seq("a", list(range(30)))
    assert bm.allocate_cached_prefix(first) == 0
    compute_all(bm, first)
    second = seq("b", list(range(24)) + [999, 998, 997])
    cached = bm.allocate_cached_prefix(second)
    assert cached == 24 and second.num_computed_tokens == 24
    assert second.block_table == first.block_table[:3]
    assert all(bm.blocks[b].ref_count == 2 for b in second.block_table)
    assert bm.prefix_hits == 24


def test_full_hit_leaves_the_last_token_to_compute():
    bm = BlockManager(num_blocks=16, block_size=8)
    first = seq("a", list(range(16)))
    bm.allocate_cached_prefix(first)
    compute_all(bm, first)
    same = seq("b", list(range(16)))
    # Both blocks are cached, but the step computing the last token yields the logits: only block 1 is reused.
    assert bm.allocate_cached_prefix(same) == 8


def test_different_prefix_same_block_tokens_does_not_hit():
    bm = BlockManager(num_blocks=16, block_size=4)
    first = seq("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.allocate_cached_prefix(first)
    compute_all(bm, first)
    # The second block's tokens match, but its prefix differs: the chained hash must miss.
    other = seq("b", [0, 0, 0, 0, 5, 6, 7, 8, 9])
    assert bm.allocate_cached_prefix(other) == 0


def test_a_cache_salt_shares_blocks_only_with_the_same_salt():
    # One salt per tenant: another tenant's identical prompt finds nothing (its cached_tokens
    # would otherwise reveal that someone sent that prompt).
    bm = BlockManager(num_blocks=16, block_size=4)
    tenant_a = Sequence("a", list(range(9)), SamplingParams(), cache_salt="key-a")
    bm.allocate_cached_prefix(tenant_a)
    compute_all(bm, tenant_a)
    assert bm.allocate_cached_prefix(Sequence("b", list(range(9)), SamplingParams(), cache_salt="key-b")) == 0
    assert bm.allocate_cached_prefix(seq("unsalted", list(range(9)))) == 0
    assert bm.allocate_cached_prefix(Sequence("a2", list(range(9)), SamplingParams(), cache_salt="key-a")) == 8


def test_freed_blocks_stay_cached_until_evicted_tail_first():
    bm = BlockManager(num_blocks=4, block_size=4)
    first = seq("a", list(range(12)))
    bm.allocate_cached_prefix(first)
    compute_all(bm, first)
    bm.free(first)
    assert bm.num_free_blocks == 4
    # The freed blocks are still findable by a later request with the same prefix.
    again = seq("b", list(range(9)))
    assert bm.allocate_cached_prefix(again) == 8
    bm.free(again)
    # A fresh allocation evicts the least recently freed block; it is no longer a hit afterwards.
    filler = seq("c", [50, 51, 52, 53])
    assert bm.ensure_slots(filler, 4)
    evicted = filler.block_table[0]
    assert bm.blocks[evicted].hash is None
    assert evicted not in bm.cached_block_ids.values()


def test_token_ids_are_checked_not_just_hashes():
    bm = BlockManager(num_blocks=8, block_size=4)
    first = seq("a", [1, 2, 3, 4, 5])
    bm.allocate_cached_prefix(first)
    compute_all(bm, first)
    block = bm.blocks[first.block_table[0]]
    block.token_ids = (9, 9, 9, 9)  # as if another prefix had collided into this hash
    assert bm.allocate_cached_prefix(seq("b", [1, 2, 3, 4, 5])) == 0


def test_prefix_caching_off_never_hits():
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    first = seq("a", list(range(9)))
    bm.allocate_cached_prefix(first)
    compute_all(bm, first)
    assert bm.allocate_cached_prefix(seq("b", list(range(9)))) == 0
    assert bm.cached_block_ids == {}


def test_free_returns_every_block():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = seq("a", list(range(10))), seq("b", list(range(10)))
    bm.allocate_cached_prefix(a)
    compute_all(bm, a)
    bm.allocate_cached_prefix(b)
    compute_all(bm, b)
    bm.free(a)
    bm.free(b)
    assert bm.num_free_blocks == 8
    assert all(block.ref_count == 0 for block in bm.blocks)
