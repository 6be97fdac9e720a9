"""Brute-force references for the suffix tree: count by scanning every position."""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Sequence

from specray.actors.drafting.suffix.speculate import SpeculationParams, SuffixDraft


def brute_count(seqs: Sequence[Sequence[int]], pattern: Sequence[int]) -> int:
    """Occurrences of ``pattern`` in ``seqs``."""
    pattern, n = list(pattern), len(pattern)
    return sum(list(s[i : i + n]) == pattern for s in seqs for i in range(len(s) - n + 1))


def brute_next(
    seqs: Sequence[Sequence[int]], pattern: Sequence[int], max_depth: int
) -> dict[int, int]:
    """``{token: occurrences of pattern + [token]}``, within ``max_depth`` tokens."""
    pattern, n = list(pattern), len(pattern)
    if n + 1 > max_depth:
        return {}
    found: Counter[int] = Counter()
    for s in seqs:
        for i in range(len(s) - n):
            if list(s[i : i + n]) == pattern:
                found[s[i + n]] += 1
    return dict(found)


def brute_speculate(
    seqs: Sequence[Sequence[int]],
    context: Sequence[int],
    ceiling: int,
    params: SpeculationParams,
    max_depth: int,
    as_tree: bool,
) -> SuffixDraft:
    """The draft :func:`speculate` must return, from brute-force counts."""
    context = list(context)
    longest = max(
        (m for m in range(1, min(len(context), max_depth - 1) + 1)
         if brute_next(seqs, context[-m:], max_depth)),
        default=0,
    )  # fmt: skip
    best = SuffixDraft()
    for m in range(longest, 0, -1):
        budget = params.max_tokens(m, ceiling)
        if budget <= best.score:
            break
        grow = _tree if as_tree else _path
        ids, parents, probs = grow(seqs, context[-m:], budget, params.min_token_prob, max_depth)
        if sum(probs) > best.score:
            best = SuffixDraft(ids, parents, probs, m)
    return best


def _ranked(counts: dict[int, int]) -> list[tuple[int, int]]:
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _path(
    seqs: Sequence[Sequence[int]], match: list[int], budget: int, min_prob: float, max_depth: int
) -> tuple[list[int], list[int], list[float]]:
    ids: list[int] = []
    probs: list[float] = []
    prob = 1.0
    while len(ids) < budget:
        counts = brute_next(seqs, match + ids, max_depth)
        if not counts:
            break
        token, count = _ranked(counts)[0]
        prob *= count / sum(counts.values())
        if prob < min_prob:
            break
        ids.append(token)
        probs.append(prob)
    return ids, list(range(-1, len(ids) - 1)), probs


def _tree(
    seqs: Sequence[Sequence[int]], match: list[int], budget: int, min_prob: float, max_depth: int
) -> tuple[list[int], list[int], list[float]]:
    ids: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    frontier: list[tuple[float, int, int, list[int], int]] = []
    pushed = 0

    def expand(path: list[int], prob: float, parent: int) -> None:
        nonlocal pushed
        counts = brute_next(seqs, match + path, max_depth)
        total = sum(counts.values())
        for token, count in _ranked(counts):
            if prob * count / total >= min_prob:
                item = (-(prob * count / total), pushed, token, [*path, token], parent)
                heapq.heappush(frontier, item)
                pushed += 1

    expand([], 1.0, -1)
    while frontier and len(ids) < budget:
        neg_prob, _, token, path, parent = heapq.heappop(frontier)
        ids.append(token)
        parents.append(parent)
        probs.append(-neg_prob)
        expand(path, -neg_prob, len(ids) - 1)
    return ids, parents, probs
