"""Suffix Decoding: draft from suffix trees over the request and over recent outputs.

Each request has a **local** suffix tree over its own committed tokens (prompt
plus output), extended as rounds commit tokens. The drafter instance owns one
**global** :class:`SuffixCache` over the outputs (optionally prompt + output)
of requests it has finished, so a request that repeats what an earlier one
wrote (an agent re-running an edited file, a tool output quoted back) drafts
it from the first token. In a cluster each draft replica owns its own cache,
so requests of one conversation should stay on one replica.

Per round the drafter matches the request's last tokens in both trees and
keeps the higher-scoring draft (ties: local); see
:mod:`specray.actors.drafting.suffix.speculate` for matching, scoring and how
the draft length grows with the match length. Proposals are point masses
(``draft_probs=None``, ``from_lookup=True``) and carry the drafter's
confidence per token; with ``tree=True`` they are token trees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.drafting.suffix.cache import SuffixCache
from specray.actors.drafting.suffix.speculate import SpeculationParams, SuffixDraft, speculate
from specray.actors.drafting.suffix.tree import SuffixTree
from specray.actors.sampling.params import SamplingParams


@dataclass(frozen=True)
class SuffixConfig:
    """``max_depth`` bounds match plus draft length (a match of ``m`` tokens
    can draft at most ``max_depth - m``); ``cache_tokens`` is the global
    cache's budget (0 turns it off); ``cache_prompts`` caches each finished
    request's prompt with its output; ``tree`` proposes token trees."""

    max_depth: int = 32
    cache_tokens: int = 200_000
    cache_prompts: bool = False
    tree: bool = False
    speculation: SpeculationParams = field(default_factory=SpeculationParams)


def evidence(draft: SuffixDraft) -> str:
    """The kind of evidence ``draft`` rests on: which tree it came from and
    its match length's power-of-two class (1, 2+, 4+, 8+, 16+). A copy from
    an earlier request's output that matches sixteen tokens is usually the
    same text again; a two-token match in the request's own tree is a guess."""
    where = "cache" if draft.from_cache else "request"
    length = min(max(draft.match_len, 1), 16)
    return f"suffix {where} match {1 << (length.bit_length() - 1)}+"


@dataclass
class _RequestState:
    tree: SuffixTree
    seq_id: int
    prompt_len: int


class SuffixDrafter:
    """Suffix Decoding over a per-request tree and a per-instance global cache."""

    name = "suffix"
    hidden_layers: tuple[int, ...] = ()
    paths = DraftPaths(model=False, lookup=True)

    def __init__(self, config: SuffixConfig | None = None) -> None:
        self.config = config or SuffixConfig()
        self.cache = SuffixCache(self.config.cache_tokens, self.config.max_depth)
        self._requests: dict[str, _RequestState] = {}
        self.local_proposals = 0  # non-empty drafts taken from a request's own tree
        self.global_proposals = 0  # non-empty drafts taken from the global cache

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        if request_id in self._requests:
            raise ValueError(f"suffix drafter already tracks request {request_id!r}")
        tree = SuffixTree(self.config.max_depth)
        seq_id = tree.new_sequence()
        tree.extend(seq_id, prompt_ids)
        self._requests[request_id] = _RequestState(tree, seq_id, len(prompt_ids))

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        return [self.proposal(self.match(r.request_id, r.most)) for r in requests]

    def proposal(self, draft: SuffixDraft) -> DraftProposal:
        """``draft`` as a proposal (a tree when ``config.tree``)."""
        return DraftProposal(
            draft.token_ids,
            from_lookup=True,
            parents=draft.parents if self.config.tree else None,
            confidence=draft.conditional_probs(),
            evidence=evidence(draft),
        )

    def match(self, request_id: str, num_tokens: int) -> SuffixDraft:
        """The draft for one request, at most ``num_tokens`` tokens, with its
        match length and score (what a hybrid drafter reads)."""
        state = self._state(request_id)
        if num_tokens <= 0:
            return SuffixDraft()
        tokens = state.tree.sequence(state.seq_id)
        context = tokens[max(0, len(tokens) - self.config.max_depth + 1) :]
        params, as_tree = self.config.speculation, self.config.tree
        local = speculate(state.tree, context, num_tokens, params, as_tree)
        found = speculate(self.cache.tree, context, num_tokens, params, as_tree)
        if found.score > local.score:
            self.cache.use(found.source)
            self.global_proposals += 1
            return replace(found, from_cache=True)
        self.local_proposals += bool(local.token_ids)
        return local

    def accept(self, update: DraftUpdate) -> None:
        # Reads no hidden states; proposals never touch the tree, so there
        # is nothing to roll back.
        state = self._state(update.request_id)
        state.tree.extend(state.seq_id, update.new_token_ids)

    def finish(self, request_id: str) -> None:
        """Forget the request and cache its output (with its prompt when
        ``cache_prompts``) for later requests."""
        state = self._state(request_id)
        del self._requests[request_id]
        tokens = state.tree.sequence(state.seq_id)
        cached = tokens if self.config.cache_prompts else tokens[state.prompt_len :]
        self.cache.add(cached)

    def context(self, request_id: str) -> list[int]:
        """The committed tokens (prompt plus output) of a request; a copy."""
        state = self._state(request_id)
        return list(state.tree.sequence(state.seq_id))

    def _state(self, request_id: str) -> _RequestState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"suffix drafter does not track request {request_id!r}") from None
