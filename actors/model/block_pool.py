"""Copies of full blocks of a cache's per-position state, outside any slot.

A :class:`BlockPool` mirrors every :class:`PositionRows` tensor of a slot
cache with ``num_blocks`` blocks of ``block_size`` positions. Block ``b``
of a sequence (positions ``[b * B, (b + 1) * B)``) holds, of a tensor at
rate ``r``, the rows whose last position falls in the block: rows
``[floor(b * B / r), floor((b + 1) * B / r))`` (for rate 1 the block's own
tokens; for a compression rate the entries whose window the block closes).
So blocks ``0 .. n - 1`` hold rows ``< floor(n * B / r)`` of every tensor,
which is a slot's whole state at length ``n * B`` (see :class:`PositionRows`):
a prefix restores exactly, whatever the block size and the rates.

:meth:`save` copies blocks out of a slot, :meth:`load` copies a chain of
them into the start of a slot: one gather or scatter per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from specray.actors.model.kv_cache import PositionRows, SlotCache


class BlockPool:
    def __init__(self, cache: SlotCache, num_blocks: int, block_size: int) -> None:
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.layout = cache.position_rows()
        self.blocks = [self._empty(rows, num_blocks) for rows in self.layout]

    def _empty(self, rows: PositionRows, num_blocks: int) -> torch.Tensor:
        per_block = -(-self.block_size // rows.rate)  # most rows one block can hold
        shape = (num_blocks, per_block, *rows.tensor.shape[2:])
        return torch.zeros(shape, dtype=rows.tensor.dtype, device=rows.tensor.device)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.blocks)

    def save(self, slot: int, first: int, block_ids: Sequence[int]) -> None:
        """Copy blocks ``first, first + 1, ...`` of ``slot`` into pool blocks ``block_ids``."""
        for rows, pool in zip(self.layout, self.blocks, strict=True):
            span, pool_index = self._index(rows.rate, first, block_ids)
            if len(span):
                pool[pool_index] = rows.tensor[slot, span.start : span.stop]

    def load(self, slot: int, block_ids: Sequence[int]) -> None:
        """Copy pool blocks ``block_ids`` into blocks ``0, 1, ...`` of ``slot``."""
        for rows, pool in zip(self.layout, self.blocks, strict=True):
            span, pool_index = self._index(rows.rate, 0, block_ids)
            if len(span):
                rows.tensor[slot, span.start : span.stop] = pool[pool_index]

    def _index(
        self, rate: int, first: int, block_ids: Sequence[int]
    ) -> tuple[range, tuple[torch.Tensor, torch.Tensor]]:
        """The slot rows of blocks ``first ..`` at ``rate`` and, for each,
        its (pool block, row within it)."""
        size = self.block_size
        lo, hi = first * size // rate, (first + len(block_ids)) * size // rate
        rows = torch.arange(lo, hi)
        block = ((rows + 1) * rate - 1) // size  # the block holding each row's last position
        within = rows - block * size // rate
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        return range(lo, hi), (ids[block - first], within)
