"""The input of one forward pass: a batch of sequences, each with its own new
tokens and positions.

A sequence's trailing tokens may form a **token tree** (``parents``, see
:mod:`specray.actors.model.token_tree`): the target then verifies several
candidate continuations in one pass. The ``i``-th new token is still stored
in the KV cache at index ``start + i`` (its *cache position*), but its rotary
position is that of its depth along its own path (``first + depth``, where
``first`` is the cache position of the tree's first node), and it attends to
the cached prefix, the new tokens before the tree, and its own ancestors only.
Every logit of a tree node then equals the logit of the same token verified
as a chain along its root-to-node path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from specray.actors.model.token_tree import ancestor_mask, check_parents, depths


@dataclass(frozen=True)
class SequenceInput:
    """New tokens of one sequence, starting at position ``start`` of ``slot``.

    ``num_logits`` asks for logits of the last that many new tokens: 1 for
    prefill and plain decode, k + 1 to verify k draft tokens, 0 for a feed
    that only fills the cache. ``parents``, when given, makes the last
    ``len(parents)`` tokens a token tree (-1: a child of the token before the
    tree, which is the last cached or fed token before them).
    """

    slot: int
    token_ids: Sequence[int]
    start: int
    num_logits: int = 1
    parents: Sequence[int] | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.num_logits <= len(self.token_ids):
            raise ValueError(
                f"num_logits must be in [0, {len(self.token_ids)}], got {self.num_logits}"
            )
        if self.parents is not None:
            if len(self.parents) > len(self.token_ids):
                raise ValueError(f"{len(self.parents)} parents for {len(self.token_ids)} tokens")
            check_parents(self.parents)

    def rotary_positions(self) -> list[int]:
        """Rotary position of each new token: its cache position, except in
        the tree, where it is the tree's first position plus the node's depth."""
        n = len(self.token_ids)
        if self.parents is None:
            return list(range(self.start, self.start + n))
        first = self.start + n - len(self.parents)
        return [*range(self.start, first), *(first + d for d in depths(self.parents))]


@dataclass(frozen=True)
class TreeBlock:
    """Where one sequence's token tree sits in a padded batch."""

    row: int  # the sequence's index in the batch
    first: int  # index of the tree's first node among the sequence's new tokens
    ancestors: torch.Tensor  # [nodes, nodes] bool: see token_tree.ancestor_mask


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
    # Token trees (see the module docstring); empty and None for a batch of chains.
    trees: list[TreeBlock] = field(default_factory=list)
    rope_positions: torch.Tensor | None = None  # [batch, max_new] int64
    flat_rope_positions: torch.Tensor | None = None  # [num_tokens] int64

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
        trees: list[TreeBlock] = []
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
            if seq.parents is not None and len(seq.parents) > 0:
                first = n - len(seq.parents)
                trees.append(TreeBlock(b, first, ancestor_mask(seq.parents)))
        rope_positions = flat_rope_positions = None
        if trees:
            rope_positions = positions.clone()
            rotary = [torch.tensor(s.rotary_positions(), dtype=torch.int64) for s in seqs]
            for b, pos in enumerate(rotary):
                rope_positions[b, : len(pos)] = pos
                rope_positions[b, len(pos) :] = pos[-1]
            flat_rope_positions = torch.cat(rotary)
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
            trees=trees,
            rope_positions=rope_positions,
            flat_rope_positions=flat_rope_positions,
        )

    @property
    def flat_rotary_positions(self) -> torch.Tensor:
        """[num_tokens] int64: the rotary position of each real token."""
        if self.flat_rope_positions is None:
            return self.flat_positions
        return self.flat_rope_positions

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
        are discarded. In a token tree a node sees, among the tree's nodes,
        only itself and its ancestors, and the window compares rotary
        positions (a node's is its depth along its path, not its cache index).
        """
        key_pos = torch.arange(self.context_len)
        query_pos = self.positions.unsqueeze(-1)  # [batch, max_new, 1]
        visible = key_pos <= query_pos
        for tree in self.trees:
            nodes = tree.ancestors.shape[0]
            first_key = int(self.positions[tree.row, tree.first])
            queries = slice(tree.first, tree.first + nodes)
            visible[tree.row, queries, first_key : first_key + nodes] = tree.ancestors
        if window is not None:
            if self.rope_positions is None:
                visible &= key_pos > query_pos - window
            else:
                key_rope = self._key_rotary_positions()  # [batch, context_len]
                query_rope = self.rope_positions.unsqueeze(-1)
                visible &= key_rope.unsqueeze(1) > query_rope - window
        return visible.unsqueeze(1)

    def _key_rotary_positions(self) -> torch.Tensor:  # [batch, context_len] int64
        """Rotary position of each cache index: the index itself, except
        where this batch writes a tree."""
        assert self.rope_positions is not None
        keys = torch.arange(self.context_len).repeat(len(self.slots), 1)
        for b, n in enumerate(self.num_new):
            start = int(self.positions[b, 0])
            keys[b, start : start + n] = self.rope_positions[b, :n]
        return keys
