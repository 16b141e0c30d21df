"""Per-request block tables on top of the block pool: prefix-cache lookup, slot allocation, and
the one function that gives a request's blocks back (`free`).

The cache is one pool of blocks shared by one or more groups of layers (a hybrid cache, as vLLM's
hybrid KV cache manager): a group is a set of layers that attend alike, so one block table serves
them all. A model without sliding windows has one group; Gemma 3 has its full-attention layers in
one and its sliding-window layers in others (the model runner groups them so every group has as
many layers, and a block holds that many layers' K/V whichever group it serves). Each request
holds one table per group:

    full group      | b0 | b1 | b2 | b3 | b4 | b5 |      every block of its tokens
    sliding group   |  - |  - |  - | b9 | b7 | b8 |      only the blocks a window still sees
                     <-- freed -->   ^ first_needed(start): the block of start - window + 1

A sliding group's queries from position `start` on see positions start - window + 1 and later, so
when a step is allocated, the request's blocks wholly before that go back to the pool (a cached
one stays findable, as any freed block) and its table holds None there (the kernels read block 0
for it, masked out). Between steps a table covers exactly the computed tokens; only its last block
may be partly empty. Full blocks are keyed (and so become shareable) as soon as the step that fills
them is scheduled: their token ids are already known. A group's key is the token chain's key with
the group's number appended (group 0's is the chain's own), since its blocks hold other layers.

A prefix hit must be a hit in every group: the longest h (whole blocks, never covering the last
token) such that the full groups hold every block before h and each sliding group the blocks its
window sees from position h (scanned from the right, as vLLM does).
"""
from __future__ import annotations

from collections.abc import Iterable

from vidya.engine.block_pool import BlockHash, BlockPool, KVBlock, hash_block_tokens
from vidya.engine.request import Request

NULL_BLOCK = 0  # what a kernel is given for a table entry no window sees (never read unmasked)
Hits = list  # per group, the blocks of a prefix hit (None where no window sees them)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True,
                 windows: tuple[int | None, ...] = (None,)) -> None:
        """`windows`: one per group of layers, None for full attention, else its sliding window."""
        if not windows or any(w is not None and w < 1 for w in windows):
            raise ValueError(f"windows {windows}: one per group, None or a window of at least 1 token")
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.windows = tuple(windows)
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[list[KVBlock | None]]] = {}  # per request, a table per group
        self.req_hashes: dict[str, list[BlockHash]] = {}
        self.num_cached_blocks: dict[str, int] = {}  # leading blocks of each table already keyed
        self.starts: dict[str, int] = {}  # the first position of each request's last allocation
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def is_hybrid(self) -> bool:
        return self.windows != (None,)

    def first_needed(self, group: int, start: int) -> int:
        """The first block of `group` that queries from position `start` on can see."""
        w = self.windows[group]
        return 0 if w is None else max(0, start - w + 1) // self.block_size

    def block_ids(self, request_id: str) -> list[int]:
        """The request's first group's table as block ids (a model without windows: its table)."""
        return self.group_block_ids(request_id)[0] if request_id in self.req_blocks else []

    def group_block_ids(self, request_id: str) -> list[list[int]]:
        """The request's tables as block ids, one per group (NULL_BLOCK where no window sees)."""
        return [[NULL_BLOCK if b is None else b.block_id for b in table]
                for table in self.req_blocks.get(request_id, [[] for _ in self.windows])]

    def _key(self, group: int, chain: BlockHash) -> BlockHash:
        return chain if group == 0 else chain + bytes([group])

    def _hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        """The token-chain keys of the request's first `num_full_blocks` blocks, extending the memo."""
        hashes = self.req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        tokens = request.all_token_ids
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens[i * bs:(i + 1) * bs]))
        return hashes

    # ---- prefix hits ---------------------------------------------------------------------------
    def get_computed_blocks(self, request: Request) -> tuple[Hits, int]:
        """The longest cached prefix of the request, in whole blocks, never covering its last
        token, that every group holds: (the hit blocks per group, the tokens they cover)."""
        empty = [[] for _ in self.windows]
        if not self.enable_caching:
            return empty, 0
        hashes = self._hashes(request, (request.num_tokens - 1) // self.block_size)
        limit = len(hashes)
        found = []
        for g, w in enumerate(self.windows):  # full groups: the run from the left bounds the hit
            blocks = []
            for i, h in enumerate(hashes[:limit] if w is None else hashes):
                block = self.pool.get_cached_block(self._key(g, h))
                if block is None and w is None:
                    limit = i
                    break
                blocks.append(block)
            found.append(blocks)
        k = self._longest_hit(found, limit)
        if k == 0:
            return empty, 0
        hits = []
        for g, blocks in enumerate(found):
            lo = self.first_needed(g, k * self.block_size)
            hits.append([None] * lo + blocks[lo:k])
        return hits, k * self.block_size

    def _longest_hit(self, found: list[list[KVBlock | None]], limit: int) -> int:
        """The most blocks k <= limit such that each sliding group holds blocks first_needed(k)..k-1."""
        for k in range(limit, 0, -1):
            if all(w is None or all(b is not None for b in found[g][self.first_needed(g, k * self.block_size):k])
                   for g, w in enumerate(self.windows)):
                return k
        return 0

    def record_prefix_query(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    # ---- allocation ----------------------------------------------------------------------------
    def _plan(self, request: Request, num_new_tokens: int, hits: Hits | None) -> tuple[int, list[int]]:
        """(the first position computed, blocks each group's table must grow by)."""
        tables = self.req_blocks.get(request.request_id)
        if tables is None:
            hits = hits or [[] for _ in self.windows]
            start = len(hits[0]) * self.block_size if hits[0] else 0
            held = [len(h) for h in hits]
        else:
            start, held = request.num_computed_tokens, [len(t) for t in tables]
        total = cdiv(start + num_new_tokens, self.block_size)
        return start, [max(0, total - h) for h in held]

    def num_new_blocks(self, request: Request, num_new_tokens: int, hits: Hits | None = None,
                       freed: Iterable[int] = ()) -> int:
        """Blocks allocate_slots would take off the free queue for this: new ones, and hit blocks
        no request holds (or that only requests ending now hold: `freed`). Blocks it would give
        back (out of a window) are not counted."""
        freed = set(freed)
        taken = sum(1 for h in hits or () for b in h if b is not None and (b.ref_cnt == 0 or b.block_id in freed))
        return sum(self._plan(request, num_new_tokens, hits)[1]) + taken

    def allocate_slots(self, request: Request, num_new_tokens: int, computed_blocks: Hits | None = None) -> bool:
        """Make room for `num_new_tokens` more tokens (after any `computed_blocks` prefix hit).
        Returns False when the pool cannot supply the blocks; then nothing is taken (blocks no
        window sees any more may have gone back)."""
        rid = request.request_id
        tables = self.req_blocks.get(rid)
        start, grow = self._plan(request, num_new_tokens, computed_blocks if tables is None else None)
        if tables is not None and self.is_hybrid:
            self._free_out_of_window(rid, tables, start)
        total = start + num_new_tokens
        if tables is not None and not any(grow):  # room in the blocks held (most decode steps)
            self.starts[rid] = start
            self._cache_full_blocks(request, tables, min(total, request.num_tokens) // self.block_size)
            return True
        hits = computed_blocks if tables is None and computed_blocks else [[] for _ in self.windows]
        hit_blocks = [b for h in hits for b in h if b is not None]
        evictable_hits = sum(1 for b in hit_blocks if b.ref_cnt == 0)
        if sum(grow) > self.pool.num_free_blocks - evictable_hits:
            return False
        if tables is None:
            tables = self.req_blocks[rid] = [list(h) for h in hits]
            self.pool.touch(hit_blocks)
        new = iter(self.pool.get_new_blocks(sum(grow)))
        for table, n in zip(tables, grow):
            table.extend(next(new) for _ in range(n))
        self.starts[rid] = start
        self._cache_full_blocks(request, tables, min(total, request.num_tokens) // self.block_size)
        return True

    def _free_out_of_window(self, rid: str, tables: list[list[KVBlock | None]], start: int) -> None:
        for g, table in enumerate(tables):
            gone = [i for i in range(min(self.first_needed(g, start), len(table))) if table[i] is not None]
            if gone:
                self.pool.free_blocks([table[i] for i in reversed(gone)])
                for i in gone:
                    table[i] = None

    def _cache_full_blocks(self, request: Request, tables: list[list[KVBlock | None]], num_full: int) -> None:
        if not self.enable_caching:
            return
        rid = request.request_id
        done = self.num_cached_blocks.get(rid, 0)
        if num_full <= done:
            return
        hashes = self._hashes(request, num_full)
        for g, table in enumerate(tables):
            for i in range(done, num_full):
                if table[i] is not None:
                    self.pool.cache_full_block(table[i], self._key(g, hashes[i]))
        self.num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Give back every block the request holds. The only way a request's blocks all return to
        the pool (finish, abort, preemption, disconnect); calling it twice is harmless."""
        tables = self.req_blocks.pop(request.request_id, None)
        self.req_hashes.pop(request.request_id, None)
        self.num_cached_blocks.pop(request.request_id, None)
        self.starts.pop(request.request_id, None)
        for table in tables or ():
            # Tail blocks first: a shared prefix's head outlives its tail in the LRU order.
            self.pool.free_blocks(b for b in reversed(table) if b is not None)

    def blocks_freed_by(self, request_id: str) -> set[int]:
        """The blocks that come back to the pool when this request ends (no other holds them)."""
        return {b.block_id for t in self.req_blocks.get(request_id, ()) for b in t if b is not None and b.ref_cnt == 1}

    def max_blocks(self, num_tokens: int, max_chunk: int) -> int:
        """The most blocks a request of `num_tokens` holds at once, computing at most `max_chunk`
        tokens a step: whether it can ever run, alone in the cache."""
        bs, out = self.block_size, 0
        for w in self.windows:
            whole = cdiv(num_tokens, bs)
            out += whole if w is None else min(whole, cdiv(w - 1 + min(max_chunk, num_tokens), bs) + 1)
        return out

    def slots(self, requests: Iterable[Request]) -> tuple[int, int]:
        """(slots allocated, slots holding a computed token) over the requests' tables, every group."""
        allocated = holding = 0
        for r in requests:
            for table in self.req_blocks.get(r.request_id, ()):
                held = [i for i, b in enumerate(table) if b is not None]
                allocated += len(held) * self.block_size
                if held:
                    holding += max(0, r.num_computed_tokens - held[0] * self.block_size)
        return allocated, holding

    # ---- invariants ----------------------------------------------------------------------------
    def check(self) -> None:
        self.pool.check([b for t in ts for b in t if b is not None] for ts in self.req_blocks.values())
        assert self.starts.keys() == self.req_blocks.keys(), "allocation starts drifted from the tables"
        for rid, tables in self.req_blocks.items():
            assert len(tables) == len(self.windows), f"{rid}: {len(tables)} tables for {len(self.windows)} groups"

    def check_request(self, request: Request, tokens: int) -> None:
        """Between steps: each table covers exactly `tokens` (the computed ones, and one planned
        ahead); a sliding group holds every block its window can still see and none that no
        window saw at the request's last allocation."""
        rid = request.request_id
        for g, table in enumerate(self.req_blocks.get(rid, [[] for _ in self.windows])):
            assert len(table) == cdiv(tokens, self.block_size), (
                f"{rid}: group {g} has {len(table)} blocks for {tokens} computed (or planned) tokens")
            if rid in self.starts:
                lo = self.first_needed(g, self.starts[rid])
                assert all(b is None for b in table[:lo]), f"{rid}: group {g} keeps a block no window sees"
                assert all(b is not None for b in table[lo:]), f"{rid}: group {g} freed a block a window sees"
