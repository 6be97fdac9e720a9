"""What a model drafter feeds: the committed tokens it has not seen (its
backlog) and the steps a round's drafts took, as the scheduler prices and
times them."""

from __future__ import annotations

from collections.abc import Sequence

from specray.actors.drafting.base import DraftProposal, DraftUpdate
from specray.actors.engine.gamma import RoundShape
from specray.actors.engine.request import RunningRequest


def backlog_after(backlog: int, drafted: int, update: DraftUpdate) -> int:
    """Committed tokens a drafter has not fed after a round: drafting, it fed
    its backlog and its first ``drafted - 1`` drafts, and keeps the accepted
    ones; not drafting, it fell further behind."""
    committed = len(update.new_token_ids)
    if drafted == 0:
        return backlog + committed
    return committed - min(update.num_accepted, drafted - 1)


def fed_steps(
    batch: Sequence[RunningRequest],
    drafts: Sequence[DraftProposal],
    lookup: bool = False,
    late: Sequence[bool] | None = None,
    cap: int | None = None,
    block: int = 1,
) -> tuple[int, ...]:
    """The steps the drafts of one path took: a model's (those it dropped
    included, :attr:`DraftProposal.dropped`; each fed its backlog first; a
    request still catching up, ``late``, fed one chunk of at most ``cap``
    tokens and drafted nothing), or with ``lookup`` the copies'."""
    lengths = [d.model_steps if d.from_lookup == lookup else 0 for d in drafts]
    backlogs = [1 if lookup else r.draft.backlog for r in batch]
    if late is not None and not lookup:
        for i, behind in enumerate(late):
            if behind:
                lengths[i] = 1
                backlogs[i] = backlogs[i] if cap is None else min(backlogs[i], cap)
    return RoundShape.of(0, lengths, backlogs, 1 if lookup else block).draft_steps
