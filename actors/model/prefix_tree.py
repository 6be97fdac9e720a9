"""Which token prefixes a prefix cache holds: a tree of full blocks.

A *block* is ``block_size`` consecutive tokens at a block-aligned position.
A node stands for one block *in the context of every block before it*: the
path from the root spells a prefix, and a node's children are keyed by
their own block's tokens. Keys are the tokens themselves (dict lookups
compare them), so two different prefixes never share a node, whatever
their hashes; SGLang's radix tree with fixed-size edges, in effect.

Each node owns one block of a :class:`~specray.actors.model.block_pool.BlockPool`.
*Pins* (reference counts) are taken by the sequences whose cache holds the
block: a pinned node is never evicted. Eviction takes the least recently
used *leaf* whose pin count is zero, so a prefix shrinks from its end and a
node never outlives its parent. Recency is a logical clock, not wall time,
so every tensor-parallel rank that sees the same calls evicts the same
blocks.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass(eq=False)
class BlockNode:
    block: int  # the pool block holding this node's rows; -1 for the root
    tokens: tuple[int, ...]  # this block's tokens (the key in its parent's children)
    parent: BlockNode | None
    serial: int  # creation order: the tie-break among equally recent leaves
    children: dict[tuple[int, ...], BlockNode] = field(default_factory=dict)
    pins: int = 0
    last_used: int = 0

    @property
    def evictable(self) -> bool:
        return self.parent is not None and self.pins == 0 and not self.children


class PrefixTree:
    """The blocks a prefix cache holds, their pins and their recency."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks and block_size >= 1, got {num_blocks}, {block_size}")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.root = BlockNode(-1, (), None, 0)
        self._free = list(range(num_blocks - 1, -1, -1))
        self._nodes: dict[int, BlockNode] = {}  # serial -> node, every node but the root
        self._serials = itertools.count(1)
        self._clock = 0
        self.evicted = 0  # blocks evicted so far

    @property
    def num_used(self) -> int:
        return len(self._nodes)

    @property
    def num_pins(self) -> int:
        """Pins held over all nodes: 0 once every sequence has let go."""
        return sum(node.pins for node in self._nodes.values())

    def tick(self) -> int:
        self._clock += 1
        return self._clock

    def block_key(self, token_ids: Sequence[int], index: int) -> tuple[int, ...]:
        size = self.block_size
        return tuple(token_ids[index * size : (index + 1) * size])

    def match(self, token_ids: Sequence[int], limit: int) -> list[BlockNode]:
        """The longest chain of cached blocks that spells a prefix of
        ``token_ids[:limit]``, root's child first; marked as used now."""
        now = self.tick()
        chain: list[BlockNode] = []
        node = self.root
        for index in range(min(limit, len(token_ids)) // self.block_size):
            child = node.children.get(self.block_key(token_ids, index))
            if child is None:
                break
            child.last_used = now
            chain.append(child)
            node = child
        return chain

    def add(self, parent: BlockNode, tokens: tuple[int, ...]) -> BlockNode | None:
        """A new child of ``parent`` (the root or a pinned node, so eviction
        cannot take it) on a free block, evicting one if none is free; None
        when every block is pinned or on a pinned path."""
        assert parent.parent is None or parent.pins > 0, "extend a pinned node or the root"
        if len(tokens) != self.block_size:
            raise ValueError(f"a block has {self.block_size} tokens, got {len(tokens)}")
        if tokens in parent.children:
            raise ValueError("that block is already cached under this parent")
        if not self._free:
            self.evict(1)
        if not self._free:
            return None
        node = BlockNode(self._free.pop(), tokens, parent, next(self._serials))
        node.last_used = self._clock
        parent.children[tokens] = node
        self._nodes[node.serial] = node
        return node

    def reserve(self, count: int) -> int:
        """Make ``count`` blocks free if eviction can (one pass for many
        :meth:`add` calls); how many are free now."""
        if len(self._free) < count:
            self.evict(count - len(self._free))
        return len(self._free)

    def evict(self, count: int) -> int:
        """Free up to ``count`` blocks, least recently used evictable leaf
        first (a parent becomes a candidate once its last child is gone);
        how many were freed."""
        heap = [(n.last_used, n.serial, n) for n in self._nodes.values() if n.evictable]
        heapq.heapify(heap)
        freed = 0
        while heap and freed < count:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            del parent.children[node.tokens]
            del self._nodes[node.serial]
            self._free.append(node.block)
            freed += 1
            self.evicted += 1
            if parent.evictable:
                heapq.heappush(heap, (parent.last_used, parent.serial, parent))
        return freed

    def pin(self, nodes: Sequence[BlockNode]) -> None:
        for node in nodes:
            node.pins += 1

    def unpin(self, nodes: Sequence[BlockNode]) -> None:
        """Let go of ``nodes``; they count as used now."""
        now = self.tick()
        for node in nodes:
            if node.pins <= 0:
                raise ValueError(f"block {node.block} is not pinned")
            node.pins -= 1
            node.last_used = now
