"""Gated pooling of every ``rate`` tokens into one compressed KV entry.

Each token projects to a value ``kv`` and a gate ``z`` (plus a learned bias
by its offset in the window); the projections ``wkv`` and ``wgate`` run in
the attention layer's one fused input matmul (:attr:`projections` names
them), and :meth:`Compressor.update` takes their outputs. Entry ``w`` of
a *disjoint* compressor (HCA) is ``Σ softmax(z) ⊙ kv`` over the tokens of
window ``w``, softmax over tokens per channel. An *overlapping* compressor (CSA) projects to two
halves per token, ``a`` and ``b``: entry ``w`` pools window ``w - 1``'s
``a`` halves together with window ``w``'s ``b`` halves (width ``2 rate``,
stride ``rate``; window ``-1`` contributes nothing). Each entry is then
RMS-normed and rotated at position ``w * rate``, the window's first token.

Entry ``w`` becomes visible to a query at position ``p`` once its window is
complete: ``w < (p + 1) // rate``.
"""

from __future__ import annotations

import torch
from torch import nn

from specray.actors.model.batch import ForwardBatch
from specray.actors.model.norm import RMSNorm
from specray.actors.model.v4.params import PartialRope
from specray.actors.model.v4.rotary import PartialRotary, apply_partial_rope
from specray.actors.model.v4.state import CompressorState
from specray.actors.parallel.weights import WeightSource


def closed_windows(batch: ForwardBatch, rate: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot and window index of every entry whose last token this batch
    feeds: windows ``[start // rate, end // rate)`` of each sequence."""
    slots: list[int] = []
    windows: list[int] = []
    for b, (slot, count) in enumerate(zip(batch.slots, batch.num_new, strict=True)):
        start = int(batch.positions[b, 0])
        first, last = start // rate, (start + count) // rate
        slots += [slot] * (last - first)
        windows += range(first, last)
    return torch.tensor(slots, dtype=torch.int64), torch.tensor(windows, dtype=torch.int64)


def visible_entries(batch: ForwardBatch, rate: int, count: int) -> torch.Tensor:
    """``[batch, max_new, count]`` bool: entry ``w`` is complete at the query's position."""
    ready = (batch.positions + 1) // rate  # [batch, max_new]
    return torch.arange(count) < ready.unsqueeze(-1)


class Compressor(nn.Module):
    def __init__(
        self,
        head_dim: int,
        rate: int,
        overlap: bool,
        rope: PartialRope,
        eps: float,
        dtype: torch.dtype,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.rate = rate
        self.overlap = overlap
        self.width = 2 * head_dim if overlap else head_dim
        self.position_bias = nn.Parameter(torch.empty(rate, self.width, dtype=torch.float32), False)
        self.kv_norm = RMSNorm(head_dim, eps, dtype, float_weight=True)
        self.rotary = PartialRotary(rope)

    @property
    def projections(self) -> list[tuple[str, int]]:
        """Checkpoint name (under the compressor's prefix) and width of each
        projection of the layer input this compressor pools: value, gate."""
        return [("wkv", self.width), ("wgate", self.width)]

    def load(self, source: WeightSource, prefix: str) -> None:
        self.position_bias.copy_(source.read(f"{prefix}.ape"))
        self.kv_norm.load(source, f"{prefix}.norm")

    def new_state(
        self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | None
    ) -> CompressorState:
        return CompressorState.empty(
            num_slots, max_len, self.rate, self.width, self.head_dim, dtype, device
        )

    def update(
        self,
        state: CompressorState,
        kv: torch.Tensor,  # [num_tokens, width], packed: the tokens' ``wkv`` projection
        gate: torch.Tensor,  # [num_tokens, width], packed: their ``wgate`` projection
        batch: ForwardBatch,
    ) -> None:
        """Store the new tokens' projections, then pool every window they close."""
        slots, positions = batch.flat_slots, batch.flat_positions
        state.token_kv[slots, positions] = kv
        gate = gate.float() + self.position_bias[positions % self.rate]
        state.token_gate[slots, positions] = gate
        entry_slots, windows = closed_windows(batch, self.rate)
        if len(windows) == 0:
            return
        span = 2 * self.rate if self.overlap else self.rate
        first = (windows - 1 if self.overlap else windows) * self.rate
        rows = first.unsqueeze(1) + torch.arange(span)  # [entries, span]
        index = (entry_slots.unsqueeze(1), rows.clamp(min=0))
        kv, gate = state.token_kv[index], state.token_gate[index]  # [entries, span, width]
        if self.overlap:
            kv, gate = self._overlap(kv), self._overlap(gate)
            missing = (rows < 0).unsqueeze(-1)  # window -1 of entry 0
            kv = kv.masked_fill(missing, 0.0)
            gate = gate.masked_fill(missing, float("-inf"))
        pooled = (kv * gate.softmax(dim=1).to(kv.dtype)).sum(dim=1)
        cos, sin = self.rotary(windows * self.rate, kv.dtype)
        state.entries[entry_slots, windows] = apply_partial_rope(self.kv_norm(pooled), cos, sin)

    def _overlap(self, rows: torch.Tensor) -> torch.Tensor:
        """``[entries, 2 rate, 2 d]`` -> ``[entries, 2 rate, d]``: the first
        window's ``a`` halves, then the second window's ``b`` halves."""
        d = self.head_dim
        return torch.cat((rows[:, : self.rate, :d], rows[:, self.rate :, d:]), dim=1)
