"""The target model as the round logic sees it: one batched verify call.

Each :class:`VerifyInput` says "your cache for this request is valid up to
``start``; feed ``token_ids`` from there and give me logits for the last
``num_logits`` of them". Rollback of rejected draft tokens therefore rides
on the next call (the cache is truncated to ``start``), and re-prefilling a
migrated request is the same call with ``start = 0``. One message per round
is what a remote, sharded target needs.

A verify from position 0 may also offer the request's committed tokens
(``lookup_ids``): a target with a prefix cache then serves the longest
cached prefix of them, feeds only the rest and says how much it served
(``VerifyOutput.prefix_hit``). The target decides what it has cached; the
round learns it from the answer of the same call. A prompt that waits for
its turn to prefill may only ask (``VerifyInput.peek``): the target says
how much of it is cached and holds nothing for it, so the scheduler prices
its turn by what is left to compute.

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
from dataclasses import dataclass, field
from typing import Protocol

import torch

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.prefix_cache import DEFAULT_BLOCK_SIZE, PrefixCache, PrefixHold


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
    # With start 0: the request's committed tokens, offered for a prefix
    # cache lookup. Positions served from the cache are not fed again.
    lookup_ids: tuple[int, ...] | None = None
    # Only report how much of lookup_ids is cached (prefix_hit): no tokens,
    # no logits, nothing attached or allocated.
    peek: bool = False
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
        if self.peek and (self.token_ids or self.num_logits or self.lookup_ids is None):
            raise ValueError("a peek offers lookup_ids and feeds no tokens")

    @property
    def tree_start(self) -> int:
        """Cache position of the first draft token (``AcceptedPath.first``
        for the next round when this input feeds a tree)."""
        return self.start + len(self.token_ids) - (self.num_logits - 1)


@dataclass
class VerifyOutput:
    """One request's verify result: its logits, or, from a target that
    honoured ``VerifyInput.argmax_only``, just their argmax per row.

    ``prefix_hit``: the positions a lookup served from the prefix cache (the
    cache then holds at least that many, however short the fed chunk);
    None when no lookup was made (none offered, or no prefix cache).
    """

    logits: torch.Tensor | None  # [num_logits, vocab] float32; None: argmax only
    hidden_states: torch.Tensor | None = None  # [num_logits, len(layers) * hidden]
    argmax_ids: torch.Tensor | None = None  # [num_logits] int64, when logits is None
    prefix_hit: int | None = None

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


@dataclass
class _Sequence:
    """One request's place in a :class:`LocalTarget`."""

    slot: int
    hold: PrefixHold | None = None  # its shared blocks, when it uses the prefix cache
    tokens: list[int] = field(default_factory=list)  # with a hold: the ids at [0, length)


class LocalTarget:
    """A target model in this process, with a KV cache slot per request and,
    with ``prefix_tokens`` > 0, a prefix cache of that many positions that
    requests offering ``lookup_ids`` share (:mod:`specray.actors.model.prefix_cache`)."""

    def __init__(
        self,
        model: DecoderModel,
        num_slots: int,
        max_len: int,
        prefix_tokens: int = 0,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        self.model = model
        self.verifies_trees = model.verifies_trees
        self.cache = model.new_cache(num_slots, max_len)
        self.prefix = PrefixCache(self.cache, prefix_tokens, block_size) if prefix_tokens else None
        self._seqs: dict[str, _Sequence] = {}

    @property
    def num_active(self) -> int:
        return len(self._seqs)

    def slot_of(self, request_id: str) -> int:
        """The cache slot holding ``request_id``."""
        return self._seqs[request_id].slot

    @property
    def prefix_pins(self) -> int:
        """Pins on shared blocks: 0 once no request holds any."""
        return self.prefix.num_pins if self.prefix is not None else 0

    def verify(
        self, inputs: Sequence[VerifyInput], hidden_layers: tuple[int, ...] = ()
    ) -> list[VerifyOutput]:
        feeds: list[SequenceInput | None] = []  # None: all it sent is cached already
        hits: list[int | None] = []
        for item in inputs:
            if item.peek:
                assert item.lookup_ids is not None
                cached = None if self.prefix is None else self.prefix.cached_length(item.lookup_ids)
                hits.append(cached)
                feeds.append(None)
                continue
            seq = self._seqs.get(item.request_id)
            if seq is None:
                seq = self._seqs[item.request_id] = _Sequence(self.cache.allocate())
            if item.accepted is not None:
                self._keep_path(seq, item.accepted)
            if item.start > self.cache.length(seq.slot):
                raise ValueError(
                    f"request {item.request_id!r}: verify starts at {item.start} but only "
                    f"{self.cache.length(seq.slot)} positions are cached"
                )
            hit = self._lookup(seq, item)
            skip = max(0, (hit or 0) - item.start)  # sent, but served from the prefix cache
            start, token_ids = item.start + skip, item.token_ids[skip:]
            self.cache.truncate(seq.slot, start)
            if seq.hold is not None:
                del seq.tokens[start:]
                seq.tokens.extend(token_ids)
            hits.append(hit)
            feeds.append(
                SequenceInput(seq.slot, token_ids, start, item.num_logits, item.parents)
                if token_ids
                else None
            )
        fed = [feed for feed in feeds if feed is not None]
        rows: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        if fed:
            out = self.model(ForwardBatch.build(fed), self.cache, hidden_layers)
            counts = [feed.num_logits for feed in fed]
            logits = out.logits.split(counts)
            hidden = out.hidden_states.split(counts) if out.hidden_states is not None else None
            rows = [(lg, None if hidden is None else hidden[i]) for i, lg in enumerate(logits)]
        self._share(inputs)
        answers = iter(rows)
        no_rows = torch.zeros(0, self.model.config.vocab_size)
        return [
            VerifyOutput(*(next(answers) if feed is not None else (no_rows, None)), prefix_hit=hit)
            for feed, hit in zip(feeds, hits, strict=True)
        ]

    def _lookup(self, seq: _Sequence, item: VerifyInput) -> int | None:
        """For a verify from 0 that offers its tokens: attach the longest
        cached prefix of them to the request's slot; its length (None: no lookup)."""
        if self.prefix is None or item.lookup_ids is None or item.start != 0:
            return None
        if seq.hold is not None:
            self.prefix.release(seq.hold)
        self.cache.truncate(seq.slot, 0)
        seq.hold = self.prefix.attach(seq.slot, item.lookup_ids)
        hit = self.prefix.length(seq.hold)
        seq.tokens = list(item.lookup_ids[:hit])
        return hit

    def _share(self, inputs: Sequence[VerifyInput]) -> None:
        """Offer each request's newly committed full blocks to the prefix
        cache: everything it fed but the drafts (the last ``num_logits - 1``)."""
        if self.prefix is None:
            return
        for item in inputs:
            if item.peek:
                continue
            seq = self._seqs[item.request_id]
            if seq.hold is not None:
                committed = len(seq.tokens) - max(item.num_logits - 1, 0)
                self.prefix.extend(seq.hold, seq.slot, seq.tokens, committed)

    def _keep_path(self, seq: _Sequence, accepted: AcceptedPath) -> None:
        """Move the accepted nodes of the tree fed last into consecutive
        places (the ids the prefix cache reads move with them)."""
        sources = [accepted.first + node for node in accepted.nodes]
        self.cache.keep_path(seq.slot, accepted.first, sources)
        if seq.hold is not None:
            kept = [seq.tokens[source] for source in sources]
            seq.tokens[accepted.first : accepted.first + len(kept)] = kept

    def release(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is None:
            return
        if seq.hold is not None and self.prefix is not None:
            self.prefix.release(seq.hold)
        self.cache.free(seq.slot)
