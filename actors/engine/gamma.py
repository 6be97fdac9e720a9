"""How many tokens to draft: an acceptance estimate and a cost model.

With per-token acceptance probability α, drafting γ tokens commits on
average ``(1 - α^(γ+1)) / (1 - α)`` tokens and costs ``γ·c + v(γ)`` target
steps, where ``c`` is the draft cost of one token relative to one target
step and ``v(γ)`` the cost of verifying γ + 1 tokens relative to one. γ = 0
(plain decoding) earns exactly 1 per 1, so a γ is chosen only when its
expected tokens per unit cost beat that: a round never costs more than it is
expected to earn.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass
class AcceptanceEstimate:
    """Exponentially weighted per-token acceptance rate with a Beta prior."""

    accepted: float = 2.0  # prior pseudo-counts: α starts at 2/3
    drafted: float = 3.0
    decay: float = 0.9

    @property
    def alpha(self) -> float:
        return self.accepted / self.drafted

    def update(self, num_drafts: int, num_accepted: int) -> None:
        if num_drafts == 0:
            # Drift back toward the prior, so a request that stopped drafting
            # after a bad stretch tries again later instead of never.
            self.accepted = self.decay * self.accepted + (1 - self.decay) * 2.0
            self.drafted = self.decay * self.drafted + (1 - self.decay) * 3.0
            return
        self.accepted = self.decay * self.accepted + num_accepted
        self.drafted = self.decay * self.drafted + num_drafts


def expected_tokens(alpha: float, gamma: int) -> float:
    """Tokens one round commits on average, including the bonus token."""
    if alpha >= 1.0:
        return float(gamma + 1)
    return (1.0 - alpha ** (gamma + 1)) / (1.0 - alpha)


def speedup(alpha: float, gamma: int, draft_cost: float, verify_cost: float) -> float:
    """Analytic speedup over plain decoding (Leviathan et al.), with the
    verify cost of γ + 1 tokens relative to one step."""
    return expected_tokens(alpha, gamma) / (gamma * draft_cost + verify_cost)


@dataclass
class GammaPolicy:
    """Chooses γ per request and round, or keeps it fixed."""

    max_gamma: int
    adaptive: bool = True
    draft_cost: float = 0.0  # c: one draft token / one target step
    # v(γ): cost of verifying γ + 1 tokens relative to one; on CPU bf16 this
    # is close to 1 for small γ, in fp32 it grows about linearly.
    verify_cost: Callable[[int], float] = lambda gamma: 1.0 + 0.02 * gamma

    def choose(self, estimate: AcceptanceEstimate, limit: int) -> int:
        """γ for one request; ``limit`` caps it (tokens left, request's own k)."""
        cap = max(0, min(self.max_gamma, limit))
        if not self.adaptive or cap == 0:
            return cap
        best_gamma, best = 0, 1.0
        for gamma in range(1, cap + 1):
            gain = speedup(estimate.alpha, gamma, self.draft_cost, self.verify_cost(gamma))
            if gain > best:
                best_gamma, best = gamma, gain
        return best_gamma
