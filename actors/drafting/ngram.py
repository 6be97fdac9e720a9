"""Prompt-lookup drafting: propose what followed the last match of the context's suffix.

For each request the drafter keeps the committed tokens and, for every n-gram size
``n`` in ``[min_ngram, max_ngram]``, a dict from n-gram to the start of its most
recent occurrence that already has a successor token. An n-gram is indexed only
once the token after it is committed, so the current suffix never matches itself.
Appending a token costs ``O(max_ngram)`` dict writes and a proposal costs
``O(max_ngram + γ)``, independent of the context length.

When the continuation after the match runs into the end of the context, the
proposal continues cyclically: a match ``p`` tokens before the suffix says the
text just repeated with period ``p``, so the token at position ``j >= len`` is
predicted as the one at ``j - p``. On repetitive text (lists, tables, loops that
repeat one line) this keeps proposals full length, where stopping at the end of
the context would cap them at ``p`` tokens; on ordinary text a match ends more
than γ tokens before the end and the rule never applies.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from specray.actors.drafting.base import DraftPaths, DraftProposal, DraftRequest, DraftUpdate
from specray.actors.sampling.params import SamplingParams


@dataclass(frozen=True)
class LookupMatch:
    """A lookup's proposal and the length of the suffix that matched (0: none).

    A longer match is better evidence that the text is being copied, which is
    what a hybrid drafter reads to choose between lookup and a model.
    """

    token_ids: list[int]
    ngram_size: int

    def proposal(self) -> DraftProposal:
        """The match as a copy. Its evidence is one kind whatever the n-gram's
        size: priced apart per size, the budget verified more and worse
        copies under load (docs/drafting.md, "Copies priced per kind of
        evidence"). The size ranks copies instead, as the first token's
        confidence ``n / (n + 1)``: the budget's calibration of survivals
        learns what each rank is worth from every copy at once."""
        confidence = [1.0] * len(self.token_ids)
        if confidence:
            confidence[0] = self.ngram_size / (self.ngram_size + 1)
        return DraftProposal(
            self.token_ids, from_lookup=True, evidence="ngram", confidence=confidence
        )


@dataclass
class _RequestState:
    token_ids: list[int]
    # last_start[k][gram]: start of the latest occurrence of ``gram`` (length
    # min_ngram + k) that is followed by at least one committed token.
    last_start: list[dict[tuple[int, ...], int]] = field(default_factory=list)


class NgramDrafter:
    """Prompt-lookup decoding (point-mass proposals; needs no model).

    Defaults come from replaying code-rewrite and free-writing outputs (γ=8,
    byte-level BPE): every extra n up to 8 raised accepted tokens per round a
    little on rewrites (max 4: 5.6, 5: 5.8, 8: 6.1) for about 130 bytes of index
    per context token each. ``min_ngram=1`` beat 2 in tokens per round (1.60 vs
    1.41 when free-writing) at the cost of proposing more tokens that fail
    (5.5 vs 2.3 per round); raise it where verifying extra tokens is expensive.
    """

    name = "ngram"
    hidden_layers: tuple[int, ...] = ()
    paths = DraftPaths(model=False, lookup=True)

    def __init__(self, max_ngram: int = 5, min_ngram: int = 1) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram=} {max_ngram=}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self._requests: dict[str, _RequestState] = {}

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        if request_id in self._requests:
            raise ValueError(f"ngram drafter already tracks request {request_id!r}")
        state = _RequestState(token_ids=[], last_start=[{} for _ in self._sizes()])
        self._requests[request_id] = state
        self._extend(state, prompt_ids)

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        return [self.match(r.request_id, r.most).proposal() for r in requests]

    def match(self, request_id: str, num_tokens: int) -> LookupMatch:
        """The proposal for one request and the size of the n-gram it came from."""
        return self._lookup(self._state(request_id), num_tokens)

    def accept(self, update: DraftUpdate) -> None:
        # Reads no hidden states; proposals never touch the state, so there
        # is nothing to roll back.
        self._extend(self._state(update.request_id), update.new_token_ids)

    def finish(self, request_id: str) -> None:
        self._state(request_id)
        del self._requests[request_id]

    def context(self, request_id: str) -> list[int]:
        """The committed tokens (prompt plus output) of a request; a copy."""
        return list(self._state(request_id).token_ids)

    def _sizes(self) -> range:
        return range(self.min_ngram, self.max_ngram + 1)

    def _state(self, request_id: str) -> _RequestState:
        try:
            return self._requests[request_id]
        except KeyError:
            raise KeyError(f"ngram drafter does not track request {request_id!r}") from None

    def _extend(self, state: _RequestState, new_token_ids: Sequence[int]) -> None:
        tokens = state.token_ids
        old_length = len(tokens)
        tokens.extend(int(t) for t in new_token_ids)
        for k, n in enumerate(self._sizes()):
            # Grams starting in [first, stop) got their successor token just now.
            first, stop = max(0, old_length - n), len(tokens) - n
            if stop <= first:
                continue
            grams = zip(*(tokens[first + i : stop + i] for i in range(n)), strict=True)
            # Later starts overwrite earlier ones: the index keeps the latest.
            state.last_start[k].update(zip(grams, range(first, stop), strict=True))

    def _lookup(self, state: _RequestState, num_tokens: int) -> LookupMatch:
        tokens = state.token_ids
        length = len(tokens)
        if num_tokens <= 0:
            return LookupMatch([], 0)
        for k in reversed(range(len(state.last_start))):
            n = self.min_ngram + k
            if n > length:
                continue
            start = state.last_start[k].get(tuple(tokens[length - n :]))
            if start is None:
                continue
            period = length - n - start  # >= 1: indexed grams have a successor
            proposal = tokens[start + n : start + n + num_tokens]
            while len(proposal) < num_tokens:
                proposal.append(proposal[len(proposal) - period])
            return LookupMatch(proposal, n)
        return LookupMatch([], 0)
