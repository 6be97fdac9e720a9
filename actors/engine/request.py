"""One request's state inside a round, and what it streams back."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from specray.actors.drafting.base import DraftStop, DraftUpdate
from specray.actors.engine.budget import DepthAcceptance, Hindsight, ProposedCopy
from specray.actors.engine.calibration import OwnRecord
from specray.actors.engine.errors import RequestRejectedError
from specray.actors.engine.floor import Pace
from specray.actors.engine.gamma import SurvivalEstimate
from specray.actors.engine.stopping import FinishReason, StopChecker
from specray.actors.engine.target import AcceptedPath
from specray.actors.sampling.grammar import GrammarMatcher, Guide
from specray.actors.sampling.params import SamplingParams, StoppingCriteria


@dataclass
class RequestStats:
    """Speculation counters of one request.

    ``mean_acceptance_length`` (τ) counts the tokens one round commits,
    including the recovered or bonus token, as vLLM and DSpark define it:
    1.0 for target-only decoding, k + 1 when every draft is accepted.
    """

    draft_tokens: int = 0
    accepted_tokens: int = 0
    rounds: int = 0
    fallback: bool = False  # the drafter failed and the request went on target-only
    cached_tokens: int = 0  # prompt positions the target served from its prefix cache
    created_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None
    num_output_tokens: int = 0

    def record_round(self, num_drafts: int, num_accepted: int) -> None:
        self.draft_tokens += num_drafts
        self.accepted_tokens += num_accepted
        self.rounds += 1

    @property
    def mean_acceptance_length(self) -> float:
        return (self.accepted_tokens + self.rounds) / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else 0.0

    @property
    def elapsed_s(self) -> float:
        end = self.finished_at if self.finished_at is not None else time.perf_counter()
        return end - self.created_at

    @property
    def tokens_per_s(self) -> float:
        elapsed = self.elapsed_s
        return self.num_output_tokens / elapsed if elapsed > 0 else 0.0

    def as_dict(self) -> dict[str, float | int | bool]:
        return {
            "draft_tokens": self.draft_tokens,
            "accepted_tokens": self.accepted_tokens,
            "rounds": self.rounds,
            "mean_acceptance_length": round(self.mean_acceptance_length, 4),
            "tokens_per_s": round(self.tokens_per_s, 3),
            "elapsed_s": round(self.elapsed_s, 4),
            "fallback": self.fallback,
            "cached_tokens": self.cached_tokens,
        }


@dataclass
class GenerationRequest:
    """What a caller asks for."""

    request_id: str
    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stopping: StoppingCriteria = field(default_factory=StoppingCriteria)
    # Draft tokens per round: None uses the engine's policy, 0 disables
    # speculation for this request (target-only on the same path).
    num_speculative_tokens: int | None = None
    guide: Guide | None = None  # structured output: what the output must match
    # True: every round drafts and verifies the whole k (the request's, else
    # the engine's) whatever the measured costs, as a fixed-k engine does;
    # False: the verify budget chooses, up to that k.
    fixed_speculation: bool = False

    def __post_init__(self) -> None:
        if not self.prompt_ids:
            raise RequestRejectedError("prompt_ids must not be empty")
        if self.fixed_speculation and self.num_speculative_tokens == 0:
            raise RequestRejectedError("fixed_speculation needs speculation on")


@dataclass
class RequestOutput:
    """One streamed chunk: the tokens and text a round added."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: FinishReason | None
    stats: RequestStats
    seed: int

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class DraftState:
    """A request's drafting between rounds: which drafter holds its state,
    what that drafter has yet to hear, and how well each way of drafting
    (copying from the context, or a model) has done for it."""

    lookup_acceptance: SurvivalEstimate
    model_acceptance: SurvivalEstimate
    replica: int | None = None  # the drafter holding its state; None: target-only for now
    gamma: int = 0  # a model's drafts asked for this round
    stop: DraftStop | None = None  # where the model stops short of gamma
    lookup_gamma: int = 0  # copies asked for this round
    backlog: int = 0  # committed tokens the drafter has not fed (its next first step)
    updates: list[DraftUpdate] = field(default_factory=list)  # verdicts not yet sent
    # How its copies fared by depth, per kind of evidence: what the budget
    # trims lookup drafts by (:class:`~specray.actors.engine.budget.CopyDepths`).
    lookup_depths: dict[str, DepthAcceptance] = field(default_factory=dict)
    hindsight: Hindsight | None = None  # the copy whose verdict it waits for
    proposed: list[ProposedCopy] = field(default_factory=list)  # copies not yet judged
    own: OwnRecord = field(default_factory=OwnRecord)  # its copies against their calibration
    # Survivals of its last ranked draft: what a stale-sized budget sizes by.
    last_survivals: list[float] | None = None
    # Its decode so far as the verify cost prices it, which the budget's
    # floor keeps near its pace without speculation; and this round's
    # priced seconds, with and without the drafts admitted.
    pace: Pace = field(default_factory=Pace)
    round_seconds: tuple[float, float] | None = None

    @property
    def most(self) -> int:
        return max(self.gamma, self.lookup_gamma)

    def attach(self, replica: int, num_committed: int) -> None:
        """The drafter ``replica`` starts from the request's committed tokens."""
        self.replica = replica
        self.updates = []
        self.backlog = num_committed

    def detach(self) -> None:
        """No drafter holds the request's state any more."""
        self.replica = None
        self.updates = []


@dataclass
class RunningRequest:
    """A request between admission and its last chunk: committed tokens and
    where each cache stands."""

    request: GenerationRequest
    seed: int
    generator: torch.Generator
    stop: StopChecker
    max_gamma: int
    draft: DraftState
    tokens: list[int]  # prompt + committed output
    cached_len: int = 0  # the target's cache is valid for tokens[:cached_len]
    # Uncached committed tokens this round feeds the target (the scheduler
    # sets it; fewer than all of them: a prefill chunk, see ``prefilling``).
    feed: int = 0
    # Before its first feed: how much of its tokens the target's prefix
    # cache held when last asked (a peek, :attr:`VerifyInput.peek`); None
    # once the target said it has no prefix cache.
    prefix_hint: int | None = 0
    target: int | None = None  # the target replica that verifies it (None: the only one)
    grammar: GrammarMatcher | None = None  # structured output, at the committed tokens
    # The last verify fed a token tree: the nodes it accepted, which the next
    # verify tells the target to keep (valid while the cache ends after them).
    tree_path: AcceptedPath | None = None
    output_ids: list[int] = field(default_factory=list)
    stats: RequestStats = field(default_factory=RequestStats)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def sampling(self) -> SamplingParams:
        return self.request.sampling

    @property
    def uncached(self) -> int:
        """Committed tokens the target's cache does not hold: 1 while
        decoding (the newest), the prompt (or what is left of it) while
        prefilling, every token after a move to another target replica."""
        return len(self.tokens) - self.cached_len

    @property
    def cached_hint(self) -> int:
        """Tokens its first feed is expected to find in the prefix cache
        (0 once it has fed anything)."""
        return (self.prefix_hint or 0) if self.cached_len == 0 else 0

    @property
    def feed_cost(self) -> int:
        """Tokens of this round's feed the target is expected to compute:
        the feed less what its prefix cache serves."""
        return max(self.feed - self.cached_hint, 0)

    @property
    def peeks(self) -> bool:
        """Fed nothing yet and sitting this round out: it asks the target
        how much of it is cached, so its turn is priced by the rest."""
        return self.feed == 0 and self.cached_len == 0 and self.prefix_hint is not None

    @property
    def prefilling(self) -> bool:
        """This round feeds a chunk of the uncached tokens, not all of them:
        it only fills the cache (no logits, no drafts, no output)."""
        return self.feed < self.uncached

    @property
    def remaining_tokens(self) -> int:
        return self.request.stopping.max_tokens - len(self.output_ids)

    @property
    def fixed(self) -> bool:
        """Drafts and verifies its whole k every round, past the budget."""
        return self.request.fixed_speculation

    @property
    def wants_draft(self) -> bool:
        return self.request.num_speculative_tokens != 0 and self.max_gamma > 0
