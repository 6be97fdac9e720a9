"""The one small Protocol every drafter implements.

A drafter tracks, per request, the committed tokens (prompt plus verified
output). Each round the engine asks it for up to ``num_tokens`` proposals,
verifies them with the target, and then tells the drafter what was committed
via :meth:`Drafter.accept`, which is also where a drafter rolls back any state
it built for rejected proposals.

Hidden-state-conditioned drafters (EAGLE / DFlash / DSpark style) name the
target layers they read in ``hidden_layers``; the engine then asks the target
for those layers and passes the hidden states of the newly committed positions
to :meth:`Drafter.accept`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from specray.actors.sampling.params import SamplingParams


@dataclass(frozen=True)
class DraftRequest:
    """One request's share of a propose call."""

    request_id: str
    num_tokens: int  # γ for this round; the drafter may return fewer


@dataclass
class DraftProposal:
    """Tokens a drafter proposes for one request.

    ``draft_probs`` is the distribution each token was sampled from, after the
    request's sampling parameters were applied. ``None`` means each token was
    proposed deterministically (a point mass), as n-gram lookup does and as
    any drafter does under greedy sampling.
    """

    token_ids: list[int]
    draft_probs: torch.Tensor | None = None  # [len(token_ids), vocab] float32

    def __len__(self) -> int:
        return len(self.token_ids)


class Drafter(Protocol):
    """What the engine needs from any drafter."""

    name: str
    # Target layers whose hidden states this drafter reads; () for none.
    hidden_layers: tuple[int, ...]

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Begin tracking a request whose committed tokens are ``prompt_ids``."""

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        """Propose up to ``num_tokens`` tokens for each request, in order."""

    def accept(
        self,
        request_id: str,
        num_accepted: int,
        new_token_ids: Sequence[int],
        target_hidden: torch.Tensor | None = None,
    ) -> None:
        """Record one verified round.

        ``new_token_ids`` are all tokens committed this round: the first
        ``num_accepted`` of the last proposal, then the recovered or bonus
        token. ``target_hidden`` is ``[len(new_token_ids), len(hidden_layers)
        * hidden_size]`` when ``hidden_layers`` is non-empty: row ``i`` is the
        target's hidden state (layers concatenated in ``hidden_layers``
        order) at the position whose output is ``new_token_ids[i]``, i.e. the
        position of the token just before it.
        """

    def finish(self, request_id: str) -> None:
        """Free all state of a request (finished, cancelled or migrated)."""
