"""Prefix caching over a position-indexed slot cache: copy on attach.

Requests that share a token prefix (a system prompt, the earlier turns of a
chat) share its KV. Full blocks of committed tokens are copied out of a
request's slot into a :class:`BlockPool` as soon as they are computed and
indexed by a :class:`PrefixTree`. A new request *attaches*: the longest
chain of cached blocks that spells a prefix of its tokens is copied into the
start of its own fresh slot, and it feeds only the rest.

Why copies, not block tables: everything a verify writes (the uncached
committed tokens, the drafts) goes into the request's own slot, so a
rejected draft or a rollback never touches a shared block, and rollback
stays "move the length back". Attention keeps reading one contiguous slot.
A block table would instead gather every context block in every layer of
every forward (CPU attention takes contiguous tensors): a cost paid at
every step, where the copy is paid once per request (docs/prefix_caching.md).

Exactness: a block is keyed by its tokens and every block before it, and
holds exactly the rows a prefill of that prefix computes (for DeepSeek-V4,
also its compressed entries: see :mod:`.block_pool`). Only committed tokens
are saved: the caller says how far its slot is committed, never a draft.
A prefix is attached short of the last token, which the request feeds to
get its logits.

A :class:`PrefixHold` is one sequence's chain of blocks, pinned so they
outlive eviction while the sequence runs; :meth:`PrefixCache.release`
lets go. Everything is deterministic in the calls it sees, so every
tensor-parallel rank makes the same decisions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specray.actors.model.block_pool import BlockPool
from specray.actors.model.kv_cache import SlotCache
from specray.actors.model.prefix_tree import BlockNode, PrefixTree

DEFAULT_BLOCK_SIZE = 16


def prefix_tokens(configured: int | None, num_slots: int, max_len: int) -> int:
    """A prefix cache's size in positions from its setting: None is the
    default, a quarter of the positions the slots hold (memory on top of
    the slots'); 0 is no prefix cache."""
    return num_slots * max_len // 4 if configured is None else configured


@dataclass
class PrefixHold:
    """The chain of cached blocks one sequence's slot holds, from position
    0, each pinned until :meth:`PrefixCache.release`."""

    nodes: list[BlockNode] = field(default_factory=list)


class PrefixCache:
    """Shared full blocks of ``cache``'s slots, ``num_tokens`` positions in all."""

    def __init__(
        self, cache: SlotCache, num_tokens: int, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> None:
        num_blocks = num_tokens // block_size
        if num_blocks < 1:
            raise ValueError(
                f"a prefix cache of {num_tokens} tokens holds no {block_size}-token block"
            )
        self.cache = cache
        self.block_size = block_size
        self.tree = PrefixTree(num_blocks, block_size)
        self.pool = BlockPool(cache, num_blocks, block_size)
        self.hit_tokens = 0  # positions attached from the cache so far

    @property
    def num_pins(self) -> int:
        return self.tree.num_pins

    def attach(self, slot: int, token_ids: Sequence[int]) -> PrefixHold:
        """Copy the longest cached prefix of ``token_ids`` (whole blocks,
        never the last token) into the empty ``slot`` and set its length."""
        if self.cache.length(slot) != 0:
            raise ValueError(f"attach needs an empty slot; slot {slot} holds positions")
        chain = self._servable(token_ids)
        if chain:
            self.pool.load(slot, [node.block for node in chain])
            self.cache.set_length(slot, len(chain) * self.block_size)
            self.hit_tokens += len(chain) * self.block_size
        self.tree.pin(chain)
        return PrefixHold(chain)

    def cached_length(self, token_ids: Sequence[int]) -> int:
        """How much of ``token_ids`` an attach would serve now (whole
        blocks, never the last token), pinning and copying nothing; the
        blocks count as used, so they are not the first evicted."""
        return len(self._servable(token_ids)) * self.block_size

    def _servable(self, token_ids: Sequence[int]) -> list[BlockNode]:
        """The cached blocks that spell a prefix of ``token_ids``, never the
        last token (a request feeds at least that one for its logits)."""
        return self.tree.match(token_ids, len(token_ids) - 1)

    def length(self, hold: PrefixHold) -> int:
        return len(hold.nodes) * self.block_size

    def extend(self, hold: PrefixHold, slot: int, token_ids: Sequence[int], committed: int) -> None:
        """Share the full blocks of ``slot`` below position ``committed``
        (``token_ids`` are its tokens, at least that far): blocks another
        sequence already saved are pinned, new ones copied into the pool.
        Stops early, to retry later, when every block is pinned."""
        end = min(committed, len(token_ids)) // self.block_size
        index = len(hold.nodes)
        if index >= end:
            return
        parent = hold.nodes[-1] if hold.nodes else self.tree.root
        while index < end:  # blocks someone else saved: no copy
            child = parent.children.get(self.tree.block_key(token_ids, index))
            if child is None:
                break
            self.tree.pin([child])
            hold.nodes.append(child)
            parent, index = child, index + 1
        first = index
        self.tree.reserve(end - first)
        while index < end:
            child = self.tree.add(parent, self.tree.block_key(token_ids, index))
            if child is None:
                break
            self.tree.pin([child])
            hold.nodes.append(child)
            parent, index = child, index + 1
        if index > first:
            self.pool.save(slot, first, [node.block for node in hold.nodes[first:index]])

    def release(self, hold: PrefixHold) -> None:
        self.tree.unpin(hold.nodes)
        hold.nodes = []
