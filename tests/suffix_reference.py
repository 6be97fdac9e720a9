"""Brute-force references for the suffix tree: count by scanning every position."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class _Node:
    path: tuple[int, ...]  # the tokens from the match to this node, its own last
    prob: float


def _tree(
    seqs: Sequence[Sequence[int]], match: list[int], budget: int, min_prob: float, max_depth: int
) -> tuple[list[int], list[int], list[float]]:
    """Add one node at a time, up to ``budget``: of every continuation of the
    match or of a node already added, the most probable; ties go to the
    continuation of the node added first (the match before any), then to the
    smaller token. Not a sort of all candidates by probability: rounding can
    make a child's probability exceed its parent's by an ulp."""
    candidates = _continuations(seqs, match, _Node((), 1.0), min_prob, max_depth)
    position: dict[tuple[int, ...], int] = {(): -1}
    chosen: list[_Node] = []
    while len(chosen) < budget:
        available = [n for n in candidates if n.path[:-1] in position and n.path not in position]
        if not available:
            break
        best = min(available, key=lambda n: (-n.prob, position[n.path[:-1]], n.path[-1]))
        position[best.path] = len(chosen)
        chosen.append(best)
    parents = [position[n.path[:-1]] for n in chosen]
    return [n.path[-1] for n in chosen], parents, [n.prob for n in chosen]


def _continuations(
    seqs: Sequence[Sequence[int]], match: list[int], node: _Node, min_prob: float, max_depth: int
) -> list[_Node]:
    """Every descendant of ``node`` that, like all its ancestors, is at least
    ``min_prob`` likely."""
    counts = brute_next(seqs, match + list(node.path), max_depth)
    total = sum(counts.values())
    found: list[_Node] = []
    for token, count in counts.items():
        child = _Node((*node.path, token), node.prob * count / total)
        if child.prob >= min_prob:
            found += [child, *_continuations(seqs, match, child, min_prob, max_depth)]
    return found
