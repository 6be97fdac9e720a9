"""How many of its uncached tokens each request feeds the target in a
round: prefill chunks within a per-round token budget (vLLM's
``max_num_batched_tokens``), beside the requests that decode."""

from __future__ import annotations

from collections.abc import Sequence

from specray.actors.engine.request import RunningRequest

# Tokens one target replica feeds per round unless configured otherwise.
DEFAULT_MAX_BATCHED_TOKENS = 512


def assign_feeds(group: Sequence[RunningRequest], budget: int | None) -> None:
    """How many of its uncached tokens each request of one target replica's
    batch feeds this round (``feed``), ``budget`` the tokens the target may
    compute (None: every prompt whole).

    Requests that decode feed their one token and are never held back;
    prompts (and re-prefills after a move) share the rest of the budget.
    At least a quarter of the budget goes to prefills whatever decodes,
    and the oldest prompt keeps a quarter of that, so every prompt moves
    on; the rest goes to the prompts with the least left first, so a
    short request that arrives while a long prompt prefills is not queued
    behind all of it. A request whose turn has not come feeds nothing
    (feed 0) and sits the round out.

    A prompt is priced by what the target will compute of it: a prompt
    never fed is served its cached prefix on its first feed, and while
    it waits its turn it asks how long that is (``prefix_hint``, a peek).
    Its first chunk then covers the cached prefix and its share of the
    rest, and it ranks by the rest. Priced whole, sixteen cached prompts
    sent together started over several rounds, the later ones seconds
    behind, and drafts rode on rounds whose prefill cost was imagined.
    """
    if budget is None:
        for run in group:
            run.feed = run.uncached
        return
    decoding = sum(run.uncached for run in group if run.uncached <= 1)
    left = max(budget - decoding, budget // 4, 1)
    prefills = [run for run in group if run.uncached > 1]
    for run in group:
        run.feed = run.uncached if run.uncached <= 1 else 0
    if not prefills:
        return
    left -= _compute_more(prefills[0], max(left // 4, 1))
    for run in sorted(prefills, key=lambda r: r.uncached - r.cached_hint):
        left -= _compute_more(run, left)


def _compute_more(run: RunningRequest, tokens: int) -> int:
    """Grow ``run``'s feed by up to ``tokens`` the target computes (its first
    feed also covers the prefix its cache serves); the tokens added."""
    before = run.feed_cost
    if tokens > 0:
        run.feed = min(run.uncached, run.cached_hint + before + tokens)
    return run.feed_cost - before
