"""How many tokens to draft: the acceptance estimate and the round scheduler.

With per-token acceptance probability α, drafting γ tokens commits on
average ``(1 - α^(γ+1)) / (1 - α)`` tokens and costs γ draft steps plus one
verify of γ + 1 tokens. :func:`schedule_gammas` picks every request's γ of
a round from measured costs (:mod:`specray.actors.engine.costs`) so that the
round's expected tokens per second are highest; γ = 0 (plain decoding)
earns exactly one token per request, so a round is never expected to earn
less than plain decoding.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one round commits on average, including the bonus token."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup(alpha: float, gamma: int, draft_cost: float, verify_cost: float) -> float:
    """Analytic speedup over plain decoding (Leviathan et al.): a round
    drafts γ tokens at ``draft_cost`` target steps each and verifies γ + 1
    tokens at ``verify_cost`` target steps, and commits
    :func:`expected_tokens` of them. The one formula every benchmark and the
    planner use."""
    return expected_tokens(alpha, gamma) / (gamma * draft_cost + verify_cost)


@dataclass
class SurvivalEstimate:
    """Per-token acceptance α, counted over *tested* drafts only.

    A round stops at its first rejection, so the drafts after it are never
    tested: counting accepted drafts plus the one rejected (if any) is the
    maximum-likelihood α under i.i.d. acceptance, i.e. DSpark's conditional
    survival probability of the next draft (counting every draft proposed
    would read α = 0.8 at γ = 4 as about 0.59). An exponential decay follows
    the text as it changes; rounds without drafts drift back toward the
    prior, so a request that stopped drafting after a bad stretch tries
    again later instead of never. The prior is a parameter so a new request
    can start from the pool's α.
    """

    accepted: float = 2.0  # pseudo-counts: α starts at 2/3
    drafted: float = 3.0
    decay: float = 0.9
    prior_accepted: float = 2.0
    prior_drafted: float = 3.0
    tested: float = 0.0  # drafts tested since it started, never decayed (:attr:`optimistic`)

    @property
    def alpha(self) -> float:
        return self.accepted / self.drafted

    @property
    def optimistic(self) -> float:
        """α plus one standard error of the evidence behind it (the drafts
        tested since it started and the prior's pseudo-drafts), at most 1:
        optimism under uncertainty. A request with little evidence of its
        own is priced near the top of what it might be, so it is tried and
        then priced by what it showed; with evidence the two meet. The
        evidence is counted without decay: a decayed count would stay a few
        rounds' worth, and the optimism with it.

        Priced at its prior, the pool's α, one stretch of prompts a draft
        model cannot follow (a warm-up's random tokens) kept every later
        request from drafting: a small draft model on a CPU pays only well
        above the prior's 2/3, the pool fell below that, and a request that
        does not draft never shows that it is better."""
        alpha = self.alpha
        evidence = self.prior_drafted + self.tested
        return min(1.0, alpha + math.sqrt(alpha * (1.0 - alpha) / (evidence + 1.0)))

    @classmethod
    def with_prior(cls, alpha: float, weight: float = 3.0, tested: float = 0.0) -> SurvivalEstimate:
        """A fresh estimate whose prior is ``alpha`` worth ``weight`` drafts,
        as if ``tested`` drafts had shown it (no optimism left about it)."""
        alpha = min(max(alpha, 0.0), 1.0)
        prior = alpha * weight
        return cls(prior, weight, prior_accepted=prior, prior_drafted=weight, tested=tested)

    def update(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            self.accepted = self.decay * self.accepted + (1 - self.decay) * self.prior_accepted
            self.drafted = self.decay * self.drafted + (1 - self.decay) * self.prior_drafted
            return
        tested = num_accepted + (1 if num_accepted < num_drafts else 0)
        self.accepted = self.decay * self.accepted + num_accepted
        self.drafted = self.decay * self.drafted + tested
        self.tested += tested


@dataclass(frozen=True)
class RoundShape:
    """What one round does, as its cost model sees it: the tokens the target
    verifies in one batch, and the tokens the drafter feeds at each of its
    sequential steps (step 0 feeds each drafting request's committed tokens
    it has not seen, one when it is in step; step ``s`` one draft per
    request drafting deeper than ``s``). Its depth is the deepest γ."""

    verify_tokens: int
    draft_steps: tuple[int, ...] = ()

    @property
    def depth(self) -> int:
        return len(self.draft_steps)

    @classmethod
    def of(
        cls,
        verify_tokens: int,
        gammas: Sequence[int],
        backlogs: Sequence[int] | None = None,
        block: int = 1,
    ) -> RoundShape:
        """The shape of a round that drafts ``gammas``, each request's first
        step feeding its backlog (1 each when ``backlogs`` is None), each
        step yielding ``block`` drafts (:attr:`DraftPaths.block`)."""
        behind = [1] * len(gammas) if backlogs is None else backlogs
        steps = [0] * block_steps(max(gammas, default=0), block)
        for gamma, backlog in zip(gammas, behind, strict=True):
            for step in range(block_steps(gamma, block)):
                steps[step] += max(backlog, 1) if step == 0 else 1
        return cls(verify_tokens, tuple(steps))


def block_steps(drafts: int, block: int = 1) -> int:
    """Model steps that yield ``drafts`` drafts, ``block`` a step."""
    return -(-max(drafts, 0) // block)


def schedule_gammas(
    alphas: Sequence[float],
    limits: Sequence[int],
    round_seconds: Callable[[RoundShape], float],
    base_tokens: int | None = None,
    entry_seconds: Sequence[float] | None = None,
    block: int = 1,
) -> list[int]:
    """γ for every request of one round, maximising expected tokens per second.

    DSpark's hardware-aware prefix scheduler (Algorithm 1 of the DSpark
    paper) with survival probability ``alpha**i`` for request ``q``'s draft
    ``i``. ``round_seconds`` is the measured time of a round of a given
    :class:`RoundShape`; it is what makes the choice load-aware.

    Start from plain decoding (every request verifies its one token). Adding
    draft ``i`` of request ``q`` costs one verified token and a draft step
    and earns ``alpha_q**i`` expected tokens; since that is non-increasing in
    ``i``, admitting candidates in descending order respects each request's
    prefix. ``base_tokens`` is what the batch verifies without drafts (one
    token per request, more for a prefill); it defaults to one per request.
    The prefill beyond one token per request is done whatever is drafted,
    so its time is left out of the comparison.

    ``entry_seconds[q]`` is charged once if request ``q`` drafts at all: its
    drafter's share of catching up on tokens it has not seen. A request
    with a high entry can make every path through it lose while the others
    would win, so the path is also walked over the requests with at most
    each entry, and the best of all is kept.

    ``block``: drafts one model step yields (:attr:`DraftPaths.block`). A
    block drafter's draft ``i`` is in step ``(i - 1) // block``, so within
    a block a draft costs its verification only.

    The answer is the best prefix of those paths, plain decoding included,
    so a schedule never expects fewer tokens per second than no speculation.
    The γs depend only on past acceptance, never on the drafts themselves,
    which keeps rejection sampling lossless.
    """
    count = len(alphas)
    if count == 0:
        return []
    entry = [0.0] * count if entry_seconds is None else list(entry_seconds)
    candidates = sorted(
        (-(alpha**i), i, q)
        for q, (alpha, limit) in enumerate(zip(alphas, limits, strict=True))
        for i in range(1, max(limit, 0) + 1)
    )
    tokens = count if base_tokens is None else base_tokens
    # A prefill's tokens are verified whatever is drafted: their time is
    # sunk, and drafts are judged by what they add against the rate of plain
    # decoding. Against a prefill round's own (far lower) rate, drafts riding
    # on it look free even when feeding the draft model a prompt costs more
    # than the tokens it earns.
    decode = round_seconds(RoundShape(count))
    sunk = max(round_seconds(RoundShape(tokens)) - decode, 0.0) if tokens > count else 0.0
    best = float(count) / decode
    best_path: list[tuple[float, int, int]] = []
    for most in sorted(set(entry)):
        path = [c for c in candidates if entry[c[2]] <= most]
        steps: list[int] = []
        expected, verified, entered = float(count), tokens, 0.0
        for taken, (neg_survival, i, q) in enumerate(path, 1):
            verified += 1
            expected -= neg_survival
            step = (i - 1) // block
            if step == len(steps):
                steps.append(0)
            if (i - 1) % block == 0:  # the request's first draft of this step
                steps[step] += 1
            if i == 1:
                entered += entry[q]
            seconds = round_seconds(RoundShape(verified, tuple(steps))) + entered - sunk
            seconds = max(seconds, 1e-12)
            if expected / seconds > best:
                best, best_path = expected / seconds, path[:taken]
    gammas = [0] * count
    for _, i, q in best_path:
        gammas[q] = max(gammas[q], i)
    return gammas
