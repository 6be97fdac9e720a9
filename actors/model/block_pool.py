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
        """``[num_blocks, rows per block, ...]`` zeros, laid out in memory in
        the cache tensor's own stride order (a dense cache keeps layers
        outermost), so copies move long contiguous runs."""
        per_block = -(-self.block_size // rows.rate)  # most rows one block can hold
        shape = (num_blocks, per_block, *rows.tensor.shape[2:])
        strides = rows.tensor.stride()
        order = sorted(range(len(shape)), key=lambda dim: -strides[dim])  # outermost first
        storage = torch.zeros(
            [shape[dim] for dim in order], dtype=rows.tensor.dtype, device=rows.tensor.device
        )
        return storage.permute([order.index(dim) for dim in range(len(shape))])

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.blocks)

    def save(self, slot: int, first: int, block_ids: Sequence[int]) -> None:
        """Copy blocks ``first, first + 1, ...`` of ``slot`` into pool blocks ``block_ids``."""
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        for rows, pool in zip(self.layout, self.blocks, strict=True):
            lo, hi = self._span(rows.rate, first, len(block_ids))
            if hi == lo:
                continue
            source = rows.tensor[slot, lo:hi]
            if self._uniform(rows.rate):
                pool[ids] = source.unflatten(0, (len(block_ids), -1))
            else:
                pool[self._index(rows.rate, first, ids)] = source

    def load(self, slot: int, block_ids: Sequence[int]) -> None:
        """Copy pool blocks ``block_ids`` into blocks ``0, 1, ...`` of ``slot``."""
        ids = torch.tensor(list(block_ids), dtype=torch.int64)
        for rows, pool in zip(self.layout, self.blocks, strict=True):
            lo, hi = self._span(rows.rate, 0, len(block_ids))
            if hi == lo:
                continue
            target = rows.tensor[slot, lo:hi]
            if self._uniform(rows.rate):
                target.unflatten(0, (len(block_ids), -1)).copy_(pool[ids])
            else:
                target.copy_(pool[self._index(rows.rate, 0, ids)])

    def _uniform(self, rate: int) -> bool:
        """Every block holds the same number of rows at ``rate``."""
        return self.block_size % rate == 0

    def _span(self, rate: int, first: int, count: int) -> tuple[int, int]:
        """The slot rows at ``rate`` of blocks ``[first, first + count)``."""
        return first * self.block_size // rate, (first + count) * self.block_size // rate

    def _index(self, rate: int, first: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For each slot row of blocks ``first ..``: its pool block and its row there."""
        size = self.block_size
        rows = torch.arange(*self._span(rate, first, len(ids)))
        block = ((rows + 1) * rate - 1) // size  # the block holding each row's last position
        return ids[block - first], rows - block * size // rate
