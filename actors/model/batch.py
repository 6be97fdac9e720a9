"""The input of one forward pass: a batch of sequences, each with its own new
tokens and positions."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SequenceInput:
    """New tokens of one sequence, starting at position ``start`` of ``slot``.

    ``num_logits`` asks for logits of the last that many new tokens: 1 for
    prefill and plain decode, k + 1 to verify k draft tokens, 0 for a feed
    that only fills the cache.
    """

    slot: int
    token_ids: Sequence[int]
    start: int
    num_logits: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.num_logits <= len(self.token_ids):
            raise ValueError(
                f"num_logits must be in [0, {len(self.token_ids)}], got {self.num_logits}"
            )


@dataclass
class ForwardBatch:
    """A batch of :class:`SequenceInput` in two layouts.

    *Packed*: the real tokens only, sequence after sequence (``num_tokens``
    rows). Everything but attention runs packed, so a one-token decode that
    shares a batch with a long prefill costs one row, not the prefill's
    length. *Padded*: ``[batch, max_new]``, right-padded; attention runs
    padded (one query block per sequence against its own slot's keys).
    """

    slots: list[int]
    token_ids: torch.Tensor  # [batch, max_new] int64, right-padded with 0
    positions: torch.Tensor  # [batch, max_new] int64; padding repeats the last position
    num_new: list[int]
    flat_slots: torch.Tensor  # [num_tokens] int64: slot of each real token
    flat_positions: torch.Tensor  # [num_tokens] int64: position of each real token
    flat_index: torch.Tensor  # [num_tokens] int64: index of each real token in [batch*max_new]
    logit_index: torch.Tensor  # [num_logit_rows] int64 into [batch*max_new]
    logit_counts: list[int]  # logit rows per sequence, in batch order
    context_len: int  # max(start + num_new): keys every query may need
    packed_token_ids: torch.Tensor  # [num_tokens] int64: the real tokens, packed
    packed_logit_index: torch.Tensor  # [num_logit_rows] int64 into [num_tokens]

    @classmethod
    def build(cls, seqs: Sequence[SequenceInput]) -> ForwardBatch:
        if not seqs:
            raise ValueError("a forward batch needs at least one sequence")
        max_new = max(len(s.token_ids) for s in seqs)
        if max_new == 0 or any(len(s.token_ids) == 0 for s in seqs):
            raise ValueError("every sequence in a forward batch needs at least one new token")
        batch = len(seqs)
        token_ids = torch.zeros(batch, max_new, dtype=torch.int64)
        positions = torch.zeros(batch, max_new, dtype=torch.int64)
        flat_slots: list[int] = []
        flat_positions: list[int] = []
        flat_index: list[int] = []
        logit_index: list[int] = []
        logit_counts: list[int] = []
        packed_token_ids: list[int] = []
        packed_logit_index: list[int] = []
        for b, seq in enumerate(seqs):
            n = len(seq.token_ids)
            token_ids[b, :n] = torch.as_tensor(seq.token_ids, dtype=torch.int64)
            pos = torch.arange(seq.start, seq.start + n)
            positions[b, :n] = pos
            positions[b, n:] = seq.start + n - 1
            flat_slots += [seq.slot] * n
            flat_positions += pos.tolist()
            rows = list(range(b * max_new, b * max_new + n))
            flat_index += rows
            wanted = rows[n - seq.num_logits :]
            logit_index += wanted
            logit_counts.append(len(wanted))
            end = len(packed_token_ids) + n
            packed_logit_index += range(end - seq.num_logits, end)
            packed_token_ids += seq.token_ids
        return cls(
            slots=[s.slot for s in seqs],
            token_ids=token_ids,
            positions=positions,
            num_new=[len(s.token_ids) for s in seqs],
            flat_slots=torch.tensor(flat_slots, dtype=torch.int64),
            flat_positions=torch.tensor(flat_positions, dtype=torch.int64),
            flat_index=torch.tensor(flat_index, dtype=torch.int64),
            logit_index=torch.tensor(logit_index, dtype=torch.int64),
            logit_counts=logit_counts,
            context_len=max(s.start + len(s.token_ids) for s in seqs),
            packed_token_ids=torch.tensor(packed_token_ids, dtype=torch.int64),
            packed_logit_index=torch.tensor(packed_logit_index, dtype=torch.int64),
        )

    @property
    def is_dense(self) -> bool:
        """Every sequence has ``max_new`` tokens: packed and padded coincide."""
        return all(n == self.token_ids.shape[1] for n in self.num_new)

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """``[num_tokens, ...]`` → ``[batch, max_new, ...]``, padding rows 0."""
        batch, max_new = self.token_ids.shape
        if self.is_dense:
            return packed.view(batch, max_new, *packed.shape[1:])
        padded = packed.new_zeros(batch * max_new, *packed.shape[1:])
        padded.index_copy_(0, self.flat_index, packed)
        return padded.view(batch, max_new, *packed.shape[1:])

    def unpad(self, padded: torch.Tensor) -> torch.Tensor:
        """``[batch, max_new, ...]`` → ``[num_tokens, ...]``: the real rows."""
        rows = padded.reshape(-1, *padded.shape[2:])
        return rows if self.is_dense else rows.index_select(0, self.flat_index)

    def end_positions(self) -> list[int]:
        """Per sequence, one past its last new position: its cache length after."""
        return [int(self.positions[b, n - 1]) + 1 for b, n in enumerate(self.num_new)]

    def attention_mask(self, window: int | None) -> torch.Tensor:
        """``[batch, 1, max_new, context_len]`` bool: may query attend to key.

        A query at position i sees keys at positions j with j <= i, and with a
        sliding window also i - window < j. Padding queries repeat the last
        real position, so their rows stay non-empty (no NaN); their outputs
        are discarded.
        """
        key_pos = torch.arange(self.context_len)
        query_pos = self.positions.unsqueeze(-1)  # [batch, max_new, 1]
        visible = key_pos <= query_pos
        if window is not None:
            visible &= key_pos > query_pos - window
        return visible.unsqueeze(1)
