"""Back-to-back timings that give the cost model its shapes: a target's
verify time against the tokens it verifies, and a drafter's feed time
against the tokens it catches up on. Taken once, when a replica (or the
in-process engine) starts, before it serves anything."""

from __future__ import annotations

import time
from collections.abc import Sequence

from specray.actors.drafting.base import CatchesUp, Drafter
from specray.actors.engine.costs import RoundCostModel
from specray.actors.engine.target import Target, VerifyInput

_PROFILE_ID = "__specray_profile__"
PROFILE_CONTEXT = 16
# Prefill chunks are profiled up to this many tokens: past it a forward is
# compute-bound, so the cost curve's linear extrapolation holds, and the
# rounds themselves refine it. Timing whole 512-token chunks three times on a
# 2-core CPU took minutes of start-up.
PROFILE_PREFILL_TOKENS = 128


def profile_sizes(
    num_slots: int, max_gamma: int, max_len: int, max_batched_tokens: int | None = None
) -> list[int]:
    """Powers of two up to the largest batch a round verifies (a full round
    of drafts, or a round's prefill budget up to
    :data:`PROFILE_PREFILL_TOKENS`), and that. With one slot no round
    drafts beside a prefill, so the prefill sizes are never asked for."""
    prefill = min(max_batched_tokens or 0, PROFILE_PREFILL_TOKENS) if num_slots > 1 else 0
    largest = max(num_slots * (max_gamma + 1), prefill)
    largest = max(1, min(largest, max_len - PROFILE_CONTEXT - 1))
    return [*(1 << i for i in range(largest.bit_length()) if 1 << i < largest), largest]


def feed_profile_sizes(max_len: int, largest: int = 256) -> tuple[int, ...]:
    """Powers of two up to ``largest`` tokens (longer catch-ups extrapolate
    linearly, as feeding that many is compute-bound)."""
    top = min(largest, max_len - 1)
    return tuple(1 << i for i in range(top.bit_length()) if 1 << i <= top)


def profile_verify(
    target: Target, sizes: Sequence[int], repeats: int = 3, enough_s: float = 0.5
) -> list[tuple[int, float]]:
    """Best-of-``repeats`` seconds of verifying ``n`` tokens after a short
    context, returning logits for all of them as a round's drafts do. A
    size stops repeating once its runs took ``enough_s``: a long forward is
    compute-bound and steady, and repeating it is most of a start-up on a
    small CPU. It borrows one request slot."""
    target.verify([VerifyInput(_PROFILE_ID, 0, [0] * PROFILE_CONTEXT, 1)])
    points = []
    for size in sizes:
        best, spent = float("inf"), 0.0
        for _ in range(repeats):
            began = time.perf_counter()
            target.verify([VerifyInput(_PROFILE_ID, PROFILE_CONTEXT, [0] * size, size)])
            took = time.perf_counter() - began
            best, spent = min(best, took), spent + took
            if spent >= enough_s:
                break
        points.append((size, best))
    target.release(_PROFILE_ID)
    return points


def profile_costs(
    target: Target,
    drafter: Drafter | None,
    num_slots: int,
    max_gamma: int,
    max_len: int,
    max_batched_tokens: int | None = None,
) -> RoundCostModel:
    """A cost model with the verify shape of ``target`` and the feed shape
    of ``drafter`` (for one that keeps a cache), timed back to back: what an
    in-process engine starts from, as a router does from its replicas'."""
    costs = RoundCostModel()
    sizes = profile_sizes(num_slots, max_gamma, max_len, max_batched_tokens)
    costs.verify.set_profile(profile_verify(target, sizes))
    if isinstance(drafter, CatchesUp):
        costs.draft.set_profile(drafter.feed_profile(feed_profile_sizes(max_len)))
    return costs
