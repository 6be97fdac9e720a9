"""What the layers of one forward pass share: the batch, the cache, and the
per-forward tensors several layers need (masks, rotary tables), made once."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.kv_cache import SlotCache
from specray.actors.model.rotary import RotaryEmbedding

T = TypeVar("T")


@dataclass
class ForwardContext:
    batch: ForwardBatch
    cache: SlotCache
    dtype: torch.dtype  # the model's activation dtype
    # Rotary embeddings of the dense attention kinds, by name ("full", "sliding").
    rotary: Mapping[str, RotaryEmbedding] = field(default_factory=dict)
    _shared: dict[Hashable, Any] = field(default_factory=dict)

    def shared(self, key: Hashable, make: Callable[[], T]) -> T:
        """``make()``, computed by the first layer that asks for ``key``."""
        if key not in self._shared:
            self._shared[key] = make()
        value: T = self._shared[key]
        return value

    def mask(self, window: int | None) -> torch.Tensor:
        """``[batch, 1, max_new, context_len]`` bool causal mask (see
        :meth:`ForwardBatch.attention_mask`)."""
        return self.shared(("mask", window), lambda: self.batch.attention_mask(window))

    def slot_index(self) -> torch.Tensor:
        """``[batch]`` int64: each sequence's cache slot."""
        return self.shared("slots", lambda: torch.tensor(self.batch.slots, dtype=torch.int64))

    def rope(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin ``[num_tokens, 1, head_dim]`` of the rotary ``name`` at
        every packed token's position."""
        rotary = self.rotary[name]
        return self.shared(
            ("rope", name), lambda: rotary(self.batch.flat_rotary_positions, self.dtype)
        )
