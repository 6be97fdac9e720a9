"""A position-indexed KV cache with O(1) rollback.

Every sequence owns a slot; the key and value of the token at position ``p``
live at index ``p`` of that slot. Rolling back rejected draft tokens is
"move the length back" (:meth:`KVCache.truncate`): stale entries beyond the
length are never read, and are overwritten by the next write.

A verified token tree leaves its nodes at consecutive indices in the order
they were fed, while the accepted path must end up contiguous:
:meth:`KVCache.keep_path` moves the path's entries into place (their keys
already carry the rotary positions of those places) and drops the rest.

Sliding-window layers keep every position too and apply the window as a
mask. A ring buffer would save memory, but then a rollback could expose
overwritten entries; full positions keep the window exact across rollbacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch

from specray.actors.parallel.block_kernel import inference_kernel


class CacheFullError(RuntimeError):
    """No free slot, or a sequence would outgrow its slot."""


@dataclass(frozen=True)
class PositionRows:
    """One tensor of a cache seen as ``[slots, rows, ...]``: row ``r`` of a
    slot belongs to positions ``[r * rate, (r + 1) * rate)`` and is a
    function of the tokens before ``(r + 1) * rate`` only (rate 1: a token's
    keys or values; a compression rate: a pooled entry). Copying a slot's
    rows below ``L // rate`` of every such tensor copies its state at length
    ``L``: what a prefix cache stores and restores."""

    tensor: torch.Tensor  # [slots, rows, ...], may be a strided view
    rate: int = 1


class SlotCache:
    """Per-sequence slots and their lengths: the part every cache shares.

    A cache holds ``num_slots`` sequences of up to ``max_len`` positions;
    what it stores per position is the subclass's. Everything stored is
    indexed by position, so :meth:`truncate` only moves the length back.
    """

    def __init__(self, num_slots: int, max_len: int) -> None:
        self.max_len = max_len
        self.num_slots = num_slots
        self._lengths = [0] * num_slots
        self._free = list(range(num_slots - 1, -1, -1))

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} KV cache slots are in use")
        slot = self._free.pop()
        self._lengths[slot] = 0
        return slot

    def free(self, slot: int) -> None:
        if slot in self._free:
            raise ValueError(f"KV cache slot {slot} is already free")
        self._lengths[slot] = 0
        self._free.append(slot)

    def length(self, slot: int) -> int:
        return self._lengths[slot]

    def truncate(self, slot: int, new_len: int) -> None:
        """Roll back: forget every position ``>= new_len``."""
        if not 0 <= new_len <= self._lengths[slot]:
            raise ValueError(
                f"cannot truncate slot {slot} of length {self._lengths[slot]} to {new_len}"
            )
        self._lengths[slot] = new_len

    def keep_path(self, slot: int, start: int, sources: list[int]) -> None:
        """Keep the entries at cache indices ``sources`` (increasing, each
        ``>= start + its rank``, below the length) as positions ``start,
        start + 1, ...``, then truncate to ``start + len(sources)``: the
        accepted path of a verified token tree. A cache whose entries depend
        on their neighbours cannot move them, and takes chains only (sources
        already in place)."""
        length = self._lengths[slot]
        targets = list(range(start, start + len(sources)))
        if any(not t <= s < length for t, s in zip(targets, sources, strict=True)) or any(
            a >= b for a, b in pairwise(sources)
        ):
            raise ValueError(f"cannot keep {sources} at {start} in slot {slot} of length {length}")
        if sources != targets:
            self._move(slot, start, sources)
        self._lengths[slot] = start + len(sources)

    def _move(self, slot: int, start: int, sources: list[int]) -> None:
        raise ValueError(f"{type(self).__name__} verifies chains only: it cannot keep a tree path")

    def check_room(self, slot: int, end: int) -> None:
        if end > self.max_len:
            raise CacheFullError(
                f"sequence in slot {slot} needs {end} positions; the cache holds {self.max_len}"
            )

    def set_length(self, slot: int, new_len: int) -> None:
        self._lengths[slot] = new_len

    def position_rows(self) -> list[PositionRows]:
        """Every tensor that holds per-position state, as :class:`PositionRows`."""
        raise NotImplementedError(f"{type(self).__name__} does not list its position rows")


class KVCache(SlotCache):
    """Keys and values of every layer for ``num_slots`` sequences."""

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,  # None: torch's default device
    ) -> None:
        super().__init__(num_slots, max_len)
        shape = (num_layers, num_slots, num_kv_heads, max_len, head_dim)
        # Zeros, not empty: masked-out garbage could be NaN, and 0 * NaN = NaN.
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)

    def _move(self, slot: int, start: int, sources: list[int]) -> None:
        index = torch.tensor(sources, device=self.keys.device)
        block = slice(start, start + len(sources))
        # index_select copies, so overlapping sources and targets are safe.
        self.keys[:, slot, :, block] = self.keys[:, slot].index_select(2, index)
        self.values[:, slot, :, block] = self.values[:, slot].index_select(2, index)

    def write(
        self,
        layer: int,
        slots: torch.Tensor,  # [tokens] int64
        positions: torch.Tensor,  # [tokens] int64
        keys: torch.Tensor,  # [tokens, kv_heads, head_dim]
        values: torch.Tensor,  # [tokens, kv_heads, head_dim]
    ) -> None:
        cache_keys, cache_values = self.keys[layer], self.values[layer]
        kernel = inference_kernel(keys, values, cache_keys)
        if (
            kernel is not None
            and keys.dtype == values.dtype == cache_keys.dtype
            and keys.stride(-1) == values.stride(-1) == 1
        ):
            kernel.cache_rows(cache_keys, cache_values, slots, positions, keys, values)
            return
        cache_keys[slots, :, positions] = keys
        cache_values[slots, :, positions] = values

    def position_rows(self) -> list[PositionRows]:
        # [layers, slots, kv_heads, max_len, head_dim] seen as
        # [slots, max_len, layers, kv_heads, head_dim]
        return [PositionRows(t.permute(1, 3, 0, 2, 4)) for t in (self.keys, self.values)]

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[slots, kv_heads, max_len, head_dim]`` keys and values of a layer,
        every slot: what a kernel that reads keys where they lie takes."""
        return self.keys[layer], self.values[layer]

    def read(self, layer: int, slots: list[int], length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[batch, kv_heads, length, head_dim]`` keys and values of ``slots``."""
        first = slots[0]
        if slots == list(range(first, first + len(slots))):
            # Contiguous slots: a view, no copy.
            block = slice(first, first + len(slots))
            return self.keys[layer, block, :, :length], self.values[layer, block, :, :length]
        index = torch.tensor(slots)
        return (
            self.keys[layer, :, :, :length].index_select(0, index),
            self.values[layer, :, :, :length].index_select(0, index),
        )
