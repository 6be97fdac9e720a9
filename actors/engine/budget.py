"""How many of a proposal's tokens to verify: a budget over drafted tokens.

Terms. A draft token's **survival** is the probability that it and all its
ancestors are accepted, estimated as the product along its path of
``conditional[d] * confidence``, where ``confidence`` is the drafter's own
estimate for the token given its parent (``DraftProposal.confidence``: a
suffix path's frequency, a draft model's probability, DSpark's confidence
head; 1 when the drafter gives none) and ``conditional[d]`` is the measured
rate at which a token at depth ``d`` was accepted when its parent was
(:class:`DepthAcceptance`, one per kind of evidence a copy rests on:
:class:`CopyDepths`), judged on every copy in hindsight (:class:`Hindsight`).
Verbatim copies are the reason for measuring it per depth: a lookup that is
right for four tokens is usually right for the next forty, which a single
per-token α (``α^i``) cannot express and which made a fixed k = 16 beat the
adaptive γ by 2-4x on verbatim edits.

:func:`budget_tokens` is DSpark's Algorithm 1 over those survivals: start
from plain decoding, admit tokens in descending survival (a parent before
its children, since survival never grows down a path), and keep the prefix
with the most expected tokens per second under the measured verify cost,
among those that leave no request of the batch below a floor of the rate
it gets without them (:class:`~specray.actors.engine.floor.Floor`).
Drafts already paid for by a model step stay; the budget trims copies,
which cost nothing to propose, so a lookup drafter is asked for its ceiling
and the budget decides afterwards. The choice reads only the drafts and
past verdicts, never the target's answer, so acceptance stays lossless.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from specray.actors.drafting.base import DraftProposal
from specray.actors.engine.floor import Floor
from specray.actors.model.token_tree import depths

MAX_DEPTH = 64  # deeper tokens share the last depth's estimate


@dataclass
class DepthAcceptance:
    """Per depth ``d`` (1 = a child of the last committed token), the rate
    at which a drafted token was accepted given that its parent was,
    counted over tested tokens with an exponential decay toward a prior.

    Each depth decays as it is tested, not with every proposal: deep depths
    are tested only when a copy is right that far, and decaying them with
    every proposal left them a token or so of evidence against the prior,
    well below how often verbatim copies were right there. Survival
    multiplies the depths, so long copies were priced far below what they
    earned, and under load the budget verified too little
    (docs/drafting.md, "Concurrency 1, 4 and 16";
    ``tests/test_budget.py::test_depths_tested_rarely_keep_their_evidence``).
    """

    prior: float = 0.6
    # The prior is worth this many tested tokens per depth. Light, because
    # hindsight judges every copy for free: worth a whole token, it took
    # about twenty right copies to trust a 16-token copy, longer than a
    # verbatim edit lasts.
    weight: float = 0.25
    decay: float = 0.95
    accepted: list[float] = field(default_factory=list)
    tested: list[float] = field(default_factory=list)

    def seeded(self, worth: float = 3.0) -> DepthAcceptance:
        """A new estimate starting from this one's rates, each depth's
        counts scaled down to at most ``worth`` tested tokens."""
        scale = [min(1.0, worth / t) if t > 0 else 0.0 for t in self.tested]
        return DepthAcceptance(
            self.prior,
            self.weight,
            accepted=[a * s for a, s in zip(self.accepted, scale, strict=True)],
            tested=[t * s for t, s in zip(self.tested, scale, strict=True)],
        )

    def conditional(self, depth: int) -> float:
        """The estimate at ``depth``; past the deepest depth ever tested,
        that depth's (a copy right that far tends to go on being right)."""
        d = min(depth, MAX_DEPTH, max(len(self.tested), 1)) - 1
        if d >= len(self.tested):
            return self.prior
        return (self.accepted[d] + self.prior * self.weight) / (self.tested[d] + self.weight)

    def record(self, depth: int, accepted: bool) -> None:
        """The verdict on one token at ``depth`` whose parent was accepted;
        what that depth's earlier verdicts taught fades."""
        if depth > MAX_DEPTH:
            return
        while len(self.tested) < depth:
            self.accepted.append(0.0)
            self.tested.append(0.0)
        d = depth - 1
        self.tested[d] = self.tested[d] * self.decay + 1.0
        self.accepted[d] = self.accepted[d] * self.decay + float(accepted)

    def update(self, max_depth: int, num_accepted: int) -> None:
        """A whole verdict on a proposal ``max_depth`` deep: depths up to
        ``num_accepted`` were accepted, the next one (if drafted) rejected."""
        for depth in range(1, min(num_accepted + 1, max_depth) + 1):
            self.record(depth, depth <= num_accepted)


@dataclass
class Hindsight:
    """A copied proposal waiting for its verdict in hindsight: how many of
    its tokens the request went on to commit.

    The budget learns per-depth acceptance from these, not from the tokens
    it let the target verify. Learning from verdicts alone is a trap: one
    early rejection makes copies look poor, the budget stops verifying
    them, and with no more verdicts the estimate never recovers (a verbatim
    edit ran at target-only speed behind it). The committed tokens judge
    every proposal for free, verified or not: a copy is deterministic, so
    for greedy requests the match is exactly what verification would have
    accepted, and for sampled ones a token matches the target's draw with
    the probability that rejection sampling accepts it.
    """

    start: int  # committed tokens when it was proposed
    token_ids: list[int]  # its main chain, untrimmed
    evidence: str = ""  # what the copy rests on (:attr:`DraftProposal.evidence`)
    judged: int = 0  # leading depths judged so far
    settled: bool = False  # every depth that will be judged is

    def judge(self, tokens: Sequence[int]) -> list[bool]:
        """Verdicts on the depths after :attr:`judged` that the committed
        ``tokens`` now settle, in depth order: a match each, up to the first
        mismatch (the deeper depths are never tested, as in verification)."""
        committed = tokens[self.start :]
        verdicts = []
        while not self.settled and self.judged < min(len(committed), len(self.token_ids)):
            match = committed[self.judged] == self.token_ids[self.judged]
            verdicts.append(match)
            self.judged += 1
            self.settled = not match
        self.settled = self.settled or self.judged == len(self.token_ids)
        return verdicts

    def continued(self, tokens: Sequence[int], chain: Sequence[int]) -> int:
        """How deep into this copy a new proposal ``chain`` starts: the
        depths committed ``tokens`` have matched so far, when ``chain``
        goes on with the copy's next token; else 0. A copy right for
        twenty tokens is judged at depth 21 on, not as a new guess."""
        matched = len(tokens) - self.start
        if self.settled or matched <= 0 or self.judged != matched:
            return 0
        ahead = self.token_ids[matched : matched + 1]
        return matched if ahead and chain[:1] == ahead else 0


@dataclass
class ProposedCopy:
    """A copy as proposed (a chain or a tree) with the survival the budget
    estimated for each token, waiting to be judged in hindsight: a token
    survived if it and its ancestors match the tokens the request commits
    next. Every proposal is judged, verified or not, as :class:`Hindsight`
    judges the tracked copy; what it teaches is how far the estimates are
    off (:class:`~specray.actors.engine.calibration.SurvivalCalibration`)."""

    start: int  # committed tokens when it was proposed
    token_ids: list[int]
    parents: list[int]  # per token, its parent's index (-1: the last committed token)
    estimates: list[float]  # per token, its estimated survival

    def verdicts(self, tokens: Sequence[int]) -> list[bool] | None:
        """Per token whether it survived, once the committed ``tokens``
        settle them all (every token with a surviving parent lies within
        them); None before."""
        committed = tokens[self.start :]
        survived: list[bool] = []
        for node, depth in enumerate(depths(self.parents)):
            parent = self.parents[node]
            alive = parent < 0 or survived[parent]
            if alive and depth >= len(committed):
                return None
            survived.append(alive and committed[depth] == self.token_ids[node])
        return survived


@dataclass
class CopyDepths:
    """Per-depth acceptance of copies, learned apart per kind of evidence
    (:attr:`DraftProposal.evidence`): a pool over every request, and each
    request's own, seeded from the pool's the first time it copies on that
    evidence. A kind the pool has not seen starts from every copy's
    estimate (:attr:`overall`), not from the bare prior: most kinds are
    first met under load, where a prior of 0.6 per depth would cut their
    first copies to a token or two however well copies fare on the server.

    One estimate for all copies averaged a resent answer, right for all its
    tokens, with a two-token match's guess. Under load the budget then
    verified a sure copy as if it were the average one, short of what a
    fixed k = 16 verified (docs/drafting.md, "Concurrency 1, 4 and 16").
    """

    decay: float = 0.98
    pool: dict[str, DepthAcceptance] = field(default_factory=dict)
    overall: DepthAcceptance = field(init=False)

    def __post_init__(self) -> None:
        self.overall = DepthAcceptance(decay=self.decay)

    def of(self, own: dict[str, DepthAcceptance], evidence: str) -> DepthAcceptance:
        """A request's estimate for ``evidence``; ``own`` holds its estimates."""
        if evidence not in own:
            own[evidence] = self._pooled(evidence).seeded()
        return own[evidence]

    def record(
        self, own: dict[str, DepthAcceptance], evidence: str, depth: int, accepted: bool
    ) -> None:
        """A verdict on one token at ``depth``, for the request and the pool."""
        self.of(own, evidence).record(depth, accepted)
        self._pooled(evidence).record(depth, accepted)
        self.overall.record(depth, accepted)

    def _pooled(self, evidence: str) -> DepthAcceptance:
        if evidence not in self.pool:
            self.pool[evidence] = replace(self.overall.seeded(), decay=self.decay)
        return self.pool[evidence]


def survivals(draft: DraftProposal, acceptance: DepthAcceptance, offset: int = 0) -> list[float]:
    """Per token of ``draft``, the estimate that it and its ancestors are
    accepted; ``offset``: depths of the same copy already committed
    (:meth:`Hindsight.continued`)."""
    parents = draft.node_parents
    confidence = draft.confidence or [1.0] * len(draft)
    out: list[float] = []
    for node, depth in enumerate(depths(parents)):
        above = 1.0 if parents[node] < 0 else out[parents[node]]
        conditional = acceptance.conditional(offset + depth + 1)
        out.append(above * conditional * min(max(confidence[node], 0.0), 1.0))
    return out


@dataclass(frozen=True)
class Baseline:
    """A batch before any ranked draft token is admitted: ``tokens`` it
    verifies anyway, the ``expected`` tokens it commits anyway, and
    ``verify_seconds(n)``, what verifying ``n`` tokens costs.
    ``call_seconds``: what a round that verifies drafts pays beyond the
    verify (the call to the drafter, where nothing else needs it), so
    that drafts must win it back before they are worth verifying."""

    tokens: int
    expected: float
    verify_seconds: Callable[[int], float]
    call_seconds: float = 0.0


def budget_tokens(
    node_survivals: Sequence[Sequence[float]],
    base: Baseline,
    size: int | None = None,
    floor: Floor | None = None,
) -> list[int]:
    """How many leading tokens of each request's draft to verify.

    ``node_survivals[q]``: survival of each of request ``q``'s draft tokens
    (in draft order; a token's ancestors come before it). Admitting a token
    adds one verified token and its survival to the expected tokens; the
    best prefix of the admission order wins, the empty one (``base`` alone)
    included, among those ``floor`` allows (None: all). ``size``: admit that
    many instead (all there are, if fewer), in the same order: a budget
    sized beforehand by :func:`budget_size`.
    """
    candidates = _admission_order(node_survivals)
    if size is None:
        size = _best_prefix(candidates, base, len(node_survivals), floor)
    counts = [0] * len(node_survivals)
    for _, i, q in candidates[:size]:
        counts[q] = max(counts[q], i + 1)
    return counts


def budget_size(
    node_survivals: Sequence[Sequence[float]], base: Baseline, floor: Floor | None = None
) -> int:
    """How many draft tokens :func:`budget_tokens` admits, in all."""
    return _best_prefix(_admission_order(node_survivals), base, len(node_survivals), floor)


def _admission_order(
    node_survivals: Sequence[Sequence[float]],
) -> list[tuple[float, int, int]]:
    """(-survival, token, request), most likely first; a parent before its
    children (equal survival: the lower index, which the parent has)."""
    return sorted(
        (-s, i, q) for q, values in enumerate(node_survivals) for i, s in enumerate(values)
    )


def _best_prefix(
    candidates: Sequence[tuple[float, int, int]],
    base: Baseline,
    requests: int,
    floor: Floor | None,
) -> int:
    """The admitted prefix of ``candidates`` with the most expected tokens
    per second that ``floor`` allows."""
    best = base.expected / max(base.verify_seconds(base.tokens), 1e-12)
    taken_best = 0
    expected, verified = base.expected, base.tokens
    gains = [0.0] * requests  # per ranked request, the expected tokens admitted
    bystanders, limits, plain = float("inf"), [float("inf")] * requests, 0.0
    if floor is not None:
        plain = base.verify_seconds(base.tokens) + floor.sunk_seconds
        bystanders, limits = floor.limits(plain, requests)
    for taken, (neg_survival, _, q) in enumerate(candidates, 1):
        expected -= neg_survival
        verified += 1
        gains[q] -= neg_survival
        if floor is not None:
            limits[q] = floor.ranked_limit(plain, q, gains[q])
        seconds = base.verify_seconds(verified) + base.call_seconds
        rate = expected / max(seconds, 1e-12)
        if rate > best and seconds <= min(bystanders, min(limits)):
            best, taken_best = rate, taken
    return taken_best
