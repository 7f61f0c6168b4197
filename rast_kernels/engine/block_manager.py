"""The host block allocator: which physical KV blocks are free and how many sequences hold each one.

Every model of the engine holds the same token positions, so one block id addresses the same slots in every
model's pool (:class:`~.cache.PagedKVCache`) and one block table per sequence serves all of them (as in the
official RAST code's vLLM fork). Full prompt blocks of ``n`` samples are shared read-only (reference counts).

Invariant: a block is in the free list iff its reference count is 0. Host-only: no tensors.
"""
from __future__ import annotations

from typing import List, Optional


class BlockAllocator:
    """Free list and reference counts of ``num_blocks`` blocks (ids ``0 .. num_blocks - 1``) of ``block_size``
    token slots."""

    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = int(num_blocks)
        self.block_size = int(block_size)
        self._free: List[int] = list(range(self.num_blocks - 1, -1, -1))  # pop() hands out low ids first
        self._refs = [0] * self.num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def holders(self, block: int) -> int:
        """How many sequences hold ``block`` (0: free)."""
        return self._refs[block]

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks holding ``num_tokens`` token slots."""
        return -(-int(num_tokens) // self.block_size)

    def allocate(self, count: int) -> Optional[List[int]]:
        """``count`` fresh blocks (reference count 1), or None (nothing taken) when fewer are free."""
        if count > len(self._free):
            return None
        out = [self._free.pop() for _ in range(count)]
        for b in out:
            self._refs[b] = 1
        return out

    def share(self, blocks) -> None:
        """One more holder of each of ``blocks``."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} is free"
            self._refs[b] += 1

    def release(self, blocks) -> None:
        """Drop one holder of each of ``blocks``; a block nobody holds goes back to the free list."""
        for b in blocks:
            assert self._refs[b] > 0, f"block {b} released twice"
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._free.append(b)
