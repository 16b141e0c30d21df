"""The block pool and KV-cache manager, tiny and exact: block size 4, a handful of blocks."""
from __future__ import annotations

import pytest

from vidya.engine.block_pool import BlockPool, hash_block_tokens
from vidya.engine.kv_cache_manager import KVCacheManager
from vidya.engine.request import Request
from vidya.sampling_params import SamplingParams


def req(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=4), eos_token_ids=None, max_tokens=4)


def admit(kv: KVCacheManager, r: Request) -> int:
    hits, num_hit = kv.get_computed_blocks(r)
    assert kv.allocate_slots(r, r.num_tokens - num_hit, hits)
    r.num_computed_tokens = r.num_tokens
    return num_hit


def test_blocks_come_from_the_head_in_order():
    kv = KVCacheManager(num_blocks=6, block_size=4)
    a = req("a", list(range(10)))  # 10 tokens -> 3 blocks, the last partly empty
    admit(kv, a)
    assert kv.block_ids("a") == [0, 1, 2]
    assert kv.pool.num_free_blocks == 3
    kv.check()


def test_prefix_hit_shares_blocks_and_never_covers_the_last_token():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a = req("a", list(range(12)))  # exactly 3 blocks
    assert admit(kv, a) == 0
    b = req("b", list(range(12)))
    assert admit(kv, b) == 8  # 2 blocks hit; the 3rd holds the last token and is recomputed
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.pool.blocks[0].ref_cnt == 2
    kv.check()


def test_free_is_idempotent_and_evicts_lru_tail_first():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    a = req("a", list(range(8)) + [99])  # blocks 0,1 full and cached; block 2 partial
    admit(kv, a)
    kv.free(a)
    kv.free(a)  # a second call changes nothing
    kv.check()
    # uncached (partial) block 2 goes to the head, cached ones to the tail in reverse order:
    assert [b.block_id for b in kv.pool.free_queue] == [2, 3, 1, 0]
    b = req("b", [50, 51, 52, 53, 54])
    admit(kv, b)
    assert kv.block_ids("b") == [2, 3]  # the cached prefix survives
    c = req("c", list(range(100, 105)))
    admit(kv, c)
    assert kv.block_ids("c") == [1, 0]  # now evicted, tail of the chain first
    assert hash_block_tokens(None, [0, 1, 2, 3]) not in kv.pool.cached  # evicted with its block
    kv.check()


def test_stale_prefix_key_is_dropped_when_a_block_is_reused():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    a = req("a", [1, 2, 3, 4, 5])
    admit(kv, a)
    kv.free(a)
    old = hash_block_tokens(None, [1, 2, 3, 4])
    assert old in kv.pool.cached
    b = req("b", [9, 9, 9, 9, 9, 9, 9])  # needs both blocks: evicts a's cached prefix
    admit(kv, b)
    assert old not in kv.pool.cached
    kv.check()
    kv.free(b)
    c = req("c", [1, 2, 3, 4, 5])
    assert admit(kv, c) == 0, "a stale key must not hit a block that now holds other tokens"


def test_double_free_is_caught_by_the_pool():
    pool = BlockPool(3)
    blocks = pool.get_new_blocks(2)
    pool.free_blocks(blocks)
    with pytest.raises(AssertionError, match="double free"):
        pool.free_blocks(blocks)


def test_allocation_failure_changes_nothing():
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a = req("a", list(range(8)))
    admit(kv, a)
    b = req("b", list(range(50, 60)))  # needs 3 blocks, 1 free
    assert not kv.allocate_slots(b, 10)
    assert kv.block_ids("b") == []
    assert kv.pool.num_free_blocks == 1
    kv.check()


def test_duplicate_identical_prompts_in_one_step_keep_one_key():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    a, b = req("a", list(range(9))), req("b", list(range(9)))
    # both looked up before either is allocated, as in one scheduling step with no cache yet
    ha, na = kv.get_computed_blocks(a)
    hb, nb = kv.get_computed_blocks(b)
    assert na == nb == 0
    assert kv.allocate_slots(a, 9, ha) and kv.allocate_slots(b, 9, hb)
    assert len(kv.pool.cached) == 2
    kv.check()
    kv.free(a)
    kv.free(b)
    kv.check()
    assert kv.pool.num_free_blocks == 8


def test_a_sliding_group_gives_back_what_no_window_sees_and_keeps_it_findable():
    """Hybrid cache (issue 33): group 0 full attention, group 1 a window of 6 tokens, blocks of 4.
    Computing from position 12 on, the window starts at 7: block 0 (positions 0-3) goes back to the
    pool while the request runs, keyed, and block 1 (4-7) stays."""
    kv = KVCacheManager(num_blocks=16, block_size=4, windows=(None, 6))
    a = req("a", list(range(12)))
    admit(kv, a)
    assert [len(t) for t in kv.group_block_ids("a")] == [3, 3]
    a.append_output_token(50)
    assert kv.allocate_slots(a, 1)  # position 12: its window is 7..12
    full, sliding = kv.req_blocks["a"]
    assert all(b is not None for b in full) and sliding[0] is None and sliding[1] is not None
    assert kv.group_block_ids("a")[1][0] == 0  # (the null block for the kernels, never read unmasked)
    kv.check()
    kv.check_request(a, 13)
    # the freed block is still cached under group 1's key (not group 0's): a later prompt finds it
    chain = hash_block_tokens(None, [0, 1, 2, 3])
    assert kv.pool.cached[chain + bytes([1])].ref_cnt == 0 and kv.pool.cached[chain].ref_cnt == 1


def test_a_hybrid_prefix_hit_must_hit_in_every_group():
    """The longest hit h is one where the full group holds every block before h and the sliding
    group the blocks its window sees from h; sliding blocks further back are not needed (None)."""
    kv = KVCacheManager(num_blocks=32, block_size=4, windows=(None, 6))
    a = req("a", list(range(20)))
    admit(kv, a)
    b = req("b", list(range(20)) + [99])
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 20 and [b is None for b in hits[1]] == [True, True, True, False, False]
    # evict group 1's key of block 3 (positions 12-15, in the window of a hit at 20): the hit
    # falls back to 12, whose window (7..12) the sliding group still holds
    kv.free(a)
    k3 = hash_block_tokens(hash_block_tokens(hash_block_tokens(hash_block_tokens(
        None, [0, 1, 2, 3]), [4, 5, 6, 7]), [8, 9, 10, 11]), [12, 13, 14, 15]) + bytes([1])
    victim = kv.pool.cached[k3]
    kv.pool.free_queue.remove(victim)
    kv.pool._evict(victim)
    kv.pool.free_queue.appendleft(victim)
    kv.check()
    hits, num_hit = kv.get_computed_blocks(b)
    assert num_hit == 12 and [x is None for x in hits[1]] == [True, False, False]
    assert kv.allocate_slots(b, b.num_tokens - num_hit, hits)
    kv.check()
