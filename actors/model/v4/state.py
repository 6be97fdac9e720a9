"""The per-slot state of V4 attention layers, indexed by position.

Per layer and slot:

* ``window_kv[p]``: the shared key/value of the token at position ``p``
  (sliding-window branch; every position is kept, the window is a mask).
* Per compressor (the attention's, and for CSA the indexer's):
  ``token_kv[p]`` / ``token_gate[p]``, the token's projections that pooling
  reads (the partial window and CSA's overlap state are just the last of
  these rows), and ``entries[w]``, the pooled entry of window ``w``
  (positions ``[w * rate, (w + 1) * rate)``), written when the window's last
  token is fed.

With ``L`` cached positions, rows ``p < L`` and entries ``w < L // rate``
are valid and nothing else is ever read: a forward from position ``L``
overwrites rows ``>= L`` before reading them and recomputes entry
``L // rate`` and later. Rolling back to ``L`` is therefore "move the
length back" (:class:`SlotCache`), and leaves exactly the state a prefill of
the first ``L`` tokens leaves, across window boundaries included.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from specray.actors.model.kv_cache import SlotCache


@dataclass
class CompressorState:
    rate: int  # tokens per entry
    token_kv: torch.Tensor  # [slots, max_len, width] model dtype
    token_gate: torch.Tensor  # [slots, max_len, width] float32, position bias added
    entries: torch.Tensor  # [slots, max_len // rate, head_dim] model dtype

    @classmethod
    def empty(
        cls,
        num_slots: int,
        max_len: int,
        rate: int,
        width: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | None,
    ) -> CompressorState:
        # Zeros, not empty: masked-out garbage could be NaN, and 0 * NaN = NaN.
        return cls(
            rate=rate,
            token_kv=torch.zeros(num_slots, max_len, width, dtype=dtype, device=device),
            token_gate=torch.zeros(num_slots, max_len, width, device=device),
            entries=torch.zeros(num_slots, max_len // rate, head_dim, dtype=dtype, device=device),
        )

    def valid(self, slot: int, length: int) -> dict[str, torch.Tensor]:
        return {
            "token_kv": self.token_kv[slot, :length],
            "token_gate": self.token_gate[slot, :length],
            "entries": self.entries[slot, : length // self.rate],
        }


@dataclass
class AttentionState:
    window_kv: torch.Tensor  # [slots, max_len, head_dim] model dtype
    compressor: CompressorState | None = None
    indexer: CompressorState | None = None


class CompressedKVCache(SlotCache):
    """Every V4 attention layer's :class:`AttentionState` for ``num_slots``
    sequences; the slot interface (allocate, truncate, ...) of :class:`KVCache`."""

    def __init__(self, num_slots: int, max_len: int, layers: list[AttentionState]) -> None:
        super().__init__(num_slots, max_len)
        self.layers = layers

    def valid_state(self, slot: int) -> dict[str, torch.Tensor]:
        """Every tensor a later forward of ``slot`` may read, cut to its
        length: the state that rollback must restore exactly."""
        length = self.length(slot)
        state: dict[str, torch.Tensor] = {}
        for i, layer in enumerate(self.layers):
            state[f"{i}.window_kv"] = layer.window_kv[slot, :length]
            for part in ("compressor", "indexer"):
                store: CompressorState | None = getattr(layer, part)
                if store is not None:
                    for name, tensor in store.valid(slot, length).items():
                        state[f"{i}.{part}.{name}"] = tensor
        return state
