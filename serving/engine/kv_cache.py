"""Paged KV-cache bookkeeping: fixed-size blocks, a free list, reference counts and prefix caching.

A full block is identified by a hash chain (hash of the parent block's hash, its token ids and the adapter),
so two requests sharing a prompt prefix share the blocks that hold it. Freed blocks keep their hash and
stay findable until the allocator reuses them (least recently freed first), which is what makes a shared
system prompt be computed once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import xxhash


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None


def block_hash(parent: int | None, token_ids: tuple[int, ...], salt: str | None) -> int:
    h = xxhash.xxh64()
    h.update(str(parent).encode())
    h.update(str(salt).encode())
    h.update(repr(token_ids).encode())
    return h.intdigest()


class BlockAllocator:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # reuse from front
        self.cached: dict[int, int] = {}  # hash -> block id
        self.hit_tokens = 0
        self.query_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_blocks

    def _take(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.cached.get(block.hash) == block_id:
            del self.cached[block.hash]
        block.hash = None
        block.ref_count = 1
        return block_id

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise RuntimeError("out of KV blocks")  # callers check can_allocate first
        return [self._take() for _ in range(n)]

    def release(self, block_ids: list[int]) -> None:
        # Reverse order: a sequence's last blocks are evicted before its first ones (prefixes live longest).
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, "double free of a KV block"
            if block.ref_count == 0:
                self.free[block_id] = None

    def lookup_prefix(self, hashes: list[int]) -> list[int]:
        """Blocks holding the longest cached prefix of this hash chain; each is referenced once more."""
        hits: list[int] = []
        if self.enable_prefix_caching:
            for h in hashes:
                block_id = self.cached.get(h)
                if block_id is None:
                    break
                hits.append(block_id)
        for block_id in hits:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self.free[block_id]
            block.ref_count += 1
        self.query_tokens += len(hashes) * self.block_size
        self.hit_tokens += len(hits) * self.block_size
        return hits

    def publish(self, block_id: int, h: int) -> None:
        """Mark a block full and final; later requests with the same prefix can reuse it."""
        if not self.enable_prefix_caching:
            return
        block = self.blocks[block_id]
        block.hash = h
        self.cached.setdefault(h, block_id)

    def all_free(self) -> bool:
        return self.num_free == self.num_blocks and all(b.ref_count == 0 for b in self.blocks)
