"""The KV-cache block pool: which physical blocks are free, shared or cached, all in O(1).

A block is in exactly one of two states:
    used  (ref_cnt > 0): in one or more requests' block tables, never in the free queue;
    free  (ref_cnt == 0): in the free queue. A free block may still hold a cached prefix
          (block_hash set), so a later request can take it back out of the middle of the queue.

The free queue is a doubly linked list ordered by eviction priority: new blocks are taken from
the head. Blocks freed with no cached content go to the head (nothing is lost by reusing them);
blocks holding a cached prefix go to the tail, so the least recently used prefix is evicted first.
"""
from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

BlockHash = bytes


def hash_block_tokens(parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
    """A full block's key: its parent's key chained with its own token ids (SHA-256, so two
    different prefixes never share a key in practice, across tenants included)."""
    h = hashlib.sha256(parent or b"\0")
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    return h.digest()


@dataclass(slots=True, eq=False)
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    prev: "KVBlock | None" = None
    next: "KVBlock | None" = None


class FreeBlockQueue:
    """Doubly linked list with O(1) popleft, append, appendleft and remove-from-middle."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self.num_free = 0
        for b in blocks:
            self.append(b)

    def _link(self, block: KVBlock, before: KVBlock) -> None:
        prev = before.prev
        assert prev is not None and block.prev is None and block.next is None
        prev.next, block.prev, block.next, before.prev = block, prev, before, block
        self.num_free += 1

    def append(self, block: KVBlock) -> None:
        self._link(block, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        assert self._head.next is not None
        self._link(block, self._head.next)

    def remove(self, block: KVBlock) -> None:
        assert block.prev is not None and block.next is not None, f"block {block.block_id} is not free"
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self.num_free -= 1

    def popleft(self) -> KVBlock:
        first = self._head.next
        assert first is not None and first is not self._tail, "no free block"
        self.remove(first)
        return first

    def __iter__(self):
        node = self._head.next
        while node is not None and node is not self._tail:
            yield node
            node = node.next


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.free_queue = FreeBlockQueue(self.blocks)
        self.cached: dict[BlockHash, KVBlock] = {}

    @property
    def num_free_blocks(self) -> int:
        return self.free_queue.num_free

    @property
    def usage(self) -> float:
        return 1.0 - self.num_free_blocks / self.num_blocks

    def get_cached_block(self, block_hash: BlockHash) -> KVBlock | None:
        return self.cached.get(block_hash) if self.enable_caching else None

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take n blocks from the head of the free queue, evicting their cached prefixes."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks with {self.num_free_blocks} free")
        out = []
        for _ in range(n):
            block = self.free_queue.popleft()
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take a reference on cache-hit blocks, pulling free ones out of the free queue."""
        for block in blocks:
            if block.ref_cnt == 0:
                self.free_queue.remove(block)
            block.ref_cnt += 1

    def cache_full_block(self, block: KVBlock, block_hash: BlockHash) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self.cached:  # the same content was computed twice (same step); keep the first
            return
        block.block_hash = block_hash
        self.cached[block_hash] = block

    def free_blocks(self, blocks: Iterable[KVBlock]) -> None:
        """Drop one reference from each block, in the given order (first = evicted first)."""
        for block in blocks:
            assert block.ref_cnt > 0, f"double free of block {block.block_id}"
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                if block.block_hash is None:
                    self.free_queue.appendleft(block)
                else:
                    self.free_queue.append(block)

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
            block.block_hash = None

    def check(self, block_tables: Iterable[Sequence[KVBlock]] = ()) -> None:
        """Assert the pool's invariants; `block_tables` are all live requests' tables."""
        free = list(self.free_queue)
        ids = [b.block_id for b in free]
        assert len(ids) == len(set(ids)), "a block is twice in the free queue"
        assert len(free) == self.free_queue.num_free, "free count drifted"
        refs = [0] * self.num_blocks
        for table in block_tables:
            for b in table:
                refs[b.block_id] += 1
        free_set = set(ids)
        for b in self.blocks:
            assert b.ref_cnt == refs[b.block_id], (
                f"block {b.block_id}: ref_cnt {b.ref_cnt} but {refs[b.block_id]} table references")
            assert (b.ref_cnt == 0) == (b.block_id in free_set), f"block {b.block_id} free/used mismatch"
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert used + len(free) == self.num_blocks, "free + used != total"
        for h, b in self.cached.items():
            assert b.block_hash == h, f"stale prefix key for block {b.block_id}"
        for b in self.blocks:
            if b.block_hash is not None:
                assert self.cached.get(b.block_hash) is b, f"block {b.block_id} hashed but not in the map"
