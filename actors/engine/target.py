"""The target model as the round logic sees it: one batched verify call.

Each :class:`VerifyInput` says "your cache for this request is valid up to
``start``; feed ``token_ids`` from there and give me logits for the last
``num_logits`` of them". Rollback of rejected draft tokens therefore rides
on the next call (the cache is truncated to ``start``), and re-prefilling a
migrated request is the same call with ``start = 0``. One message per round
is what a remote, sharded target needs.

Token trees keep that shape. A verify may feed a tree
(``VerifyInput.parents`` for its draft tokens), whose nodes the target caches
in feeding order. The round then knows which nodes were accepted; it says so
on the request's *next* call (``VerifyInput.accepted``), and the target first
moves the accepted path's cache entries into consecutive places
(:meth:`~specray.actors.model.kv_cache.KVCache.keep_path`, no forward pass),
then truncates to ``start`` as usual. A target that is never sent trees sees
no difference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel


@dataclass(frozen=True)
class AcceptedPath:
    """The accepted nodes of the tree a request's previous verify fed."""

    first: int  # cache position of that tree's first node (VerifyInput.tree_start)
    nodes: tuple[int, ...]  # accepted node indices, root's child first, each the next's parent


@dataclass(frozen=True)
class VerifyInput:
    request_id: str
    start: int  # the cache is valid for positions [0, start) (after ``accepted`` is applied)
    token_ids: list[int]  # uncached committed tokens, then the draft tokens
    num_logits: int  # number of drafts + 1
    # The caller reads only each row's argmax (greedy acceptance): a remote
    # target may answer with token ids instead of a vocabulary-wide row.
    argmax_only: bool = False
    # The draft tokens form a tree: one parent per draft token (-1: the last
    # committed token). Logit row 0 is the last committed token's, row 1 + i
    # node i's. None: a chain.
    parents: tuple[int, ...] | None = None
    # The previous verify of this request fed a tree and these of its nodes
    # were accepted: keep their cache entries (moved into place) first.
    accepted: AcceptedPath | None = None

    def __post_init__(self) -> None:
        if self.parents is not None and len(self.parents) != self.num_logits - 1:
            raise ValueError(f"{len(self.parents)} parents for {self.num_logits - 1} drafts")

    @property
    def tree_start(self) -> int:
        """Cache position of the first draft token (``AcceptedPath.first``
        for the next round when this input feeds a tree)."""
        return self.start + len(self.token_ids) - (self.num_logits - 1)


@dataclass
class VerifyOutput:
    """One request's verify result: its logits, or, from a target that
    honoured ``VerifyInput.argmax_only``, just their argmax per row."""

    logits: torch.Tensor | None  # [num_logits, vocab] float32; None: argmax only
    hidden_states: torch.Tensor | None = None  # [num_logits, len(layers) * hidden]
    argmax_ids: torch.Tensor | None = None  # [num_logits] int64, when logits is None

    @property
    def num_rows(self) -> int:
        rows = self.argmax_ids if self.logits is None else self.logits
        assert rows is not None, "a VerifyOutput holds logits or argmax ids"
        return int(rows.shape[0])

    def greedy_ids(self) -> torch.Tensor:
        """[num_logits] int64: the target's greedy token at each row."""
        if self.logits is not None:
            return self.logits.argmax(-1)
        assert self.argmax_ids is not None, "a VerifyOutput holds logits or argmax ids"
        return self.argmax_ids

    def full_logits(self) -> torch.Tensor:
        """[num_logits, vocab]: the logits; an error for an argmax-only answer."""
        if self.logits is None:
            raise ValueError("this verify output carries argmax ids only (argmax_only=True)")
        return self.logits


class Target(Protocol):
    """A target model replica, local or sharded over a TP group."""

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]: ...

    def release(self, request_id: str) -> None: ...

    @property
    def verifies_trees(self) -> bool:
        """Whether ``VerifyInput.parents`` may be given (else chains only)."""
        ...


class LocalTarget:
    """A target model in this process, with a KV cache slot per request."""

    def __init__(self, model: DecoderModel, num_slots: int, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(num_slots, max_len)
        self._slots: dict[str, int] = {}

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    @property
    def verifies_trees(self) -> bool:
        return self.model.verifies_trees

    @property
    def num_active(self) -> int:
        return len(self._slots)

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        seqs = []
        for item in inputs:
            slot = self._slots.get(item.request_id)
            if slot is None:
                slot = self._slots[item.request_id] = self.cache.allocate()
            if item.accepted is not None:
                accepted = item.accepted
                sources = [accepted.first + node for node in accepted.nodes]
                self.cache.keep_path(slot, accepted.first, sources)
            if item.start > self.cache.length(slot):
                raise ValueError(
                    f"request {item.request_id!r}: verify starts at {item.start} but only "
                    f"{self.cache.length(slot)} positions are cached"
                )
            self.cache.truncate(slot, item.start)
            seqs.append(
                SequenceInput(slot, item.token_ids, item.start, item.num_logits, item.parents)
            )
        out = self.model(ForwardBatch.build(seqs), self.cache, hidden_layers)
        counts = [item.num_logits for item in inputs]
        logits = out.logits.split(counts)
        hidden = (
            out.hidden_states.split(counts)
            if out.hidden_states is not None
            else [None] * len(counts)
        )
        return [VerifyOutput(lg, hd) for lg, hd in zip(logits, hidden, strict=True)]

    def release(self, request_id: str) -> None:
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self.cache.free(slot)
