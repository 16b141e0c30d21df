"""Per-request block tables on top of the block pool: prefix-cache lookup, slot allocation, and
the one function that gives a request's blocks back (`free`).

A request's table covers its computed tokens and the ones being computed this step; only its
last block may be partly empty. Full blocks are keyed (and so become shareable) as soon as the
step that fills them is scheduled: their token ids are already known.
"""
from __future__ import annotations

from vidya.engine.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from vidya.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVBlock]] = {}
        self.req_block_ids: dict[str, list[int]] = {}  # the same tables as ids, kept beside them
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of each table already keyed
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        """A copy of the request's table as block ids."""
        return list(self.req_block_ids.get(request_id, ()))

    def _hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The keys of the request's first `num_full_blocks` blocks, extending the memo."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of the request, in whole blocks, never covering its last token."""
        if not self.enable_caching:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVBlock] = []
        for h in self._hashes(request, max_blocks):
            block = self.pool.get_cached_block(h)
            if block is None:
                break
            hits.append(block)
        return hits, len(hits) * self.block_size

    def record_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVBlock] | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens (after any `computed_blocks` prefix hit).
        Returns False, changing nothing, when the pool cannot supply the blocks."""
        rid, bs = request.request_id, self.block_size
        blocks = self.req_blocks.get(rid)
        total = request.num_computed_tokens + num_new_tokens
        if blocks is not None and not computed_blocks and total <= len(blocks) * bs:
            # room in the blocks held (most decode steps): only a block that fills may be keyed
            if self.enable_caching and min(total, request.num_tokens) // bs > self.num_cached_blocks.get(rid, 0):
                self._cache_full_blocks(request, blocks, min(total, request.num_tokens) // bs)
            return True
        computed_blocks = computed_blocks or []
        held = len(blocks) if blocks is not None else 0
        total += len(computed_blocks) * bs
        need = cdiv(total, bs) - held - len(computed_blocks)
        # Hit blocks that sit in the free queue stop being available once we take them.
        evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if need > self.pool.num_free_blocks - evictable_hits:
            return False
        if blocks is None:
            blocks = self.req_blocks[rid] = []
            self.req_block_ids[rid] = []
        ids = self.req_block_ids[rid]
        self.pool.touch(computed_blocks)
        new = computed_blocks + (self.pool.get_new_blocks(need) if need > 0 else [])
        blocks.extend(new)
        ids.extend(b.block_id for b in new)
        if self.enable_caching:
            self._cache_full_blocks(request, blocks, min(total, request.num_tokens) // bs)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[KVBlock], num_full: int) -> None:
        rid = request.request_id
        done = self.num_cached_blocks.get(rid, 0)
        if num_full <= done:
            return
        hashes = self._hashes(request, num_full)
        for i in range(done, num_full):
            self.pool.cache_full_block(blocks[i], hashes[i])
        self.num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Give back every block the request holds. The only way blocks return to the pool
        (finish, abort, preemption, disconnect); calling it twice is harmless."""
        blocks = self.req_blocks.pop(request.request_id, None)
        self.req_block_ids.pop(request.request_id, None)
        self.req_hashes.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        if blocks:
            # Tail blocks first: a shared prefix's head outlives its tail in the LRU order.
            self.pool.free_blocks(reversed(blocks))

    def num_slots_allocated(self) -> int:
        return sum(len(b) for b in self.req_blocks.values()) * self.block_size

    def check(self) -> None:
        self.pool.check(self.req_blocks.values())
        assert self.req_block_ids.keys() == self.req_blocks.keys(), "block-id tables drifted from the tables"
        for rid, blocks in self.req_blocks.items():
            assert self.req_block_ids[rid] == [b.block_id for b in blocks], f"{rid}: block ids drifted"
