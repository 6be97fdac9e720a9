"""Draft from a suffix tree: match the context's suffix, follow frequent continuations.

Terms (after Suffix Decoding, Oliaro et al. 2024, arXiv 2411.04975):

* the **match** of length ``m`` is the context's last ``m`` tokens, located in
  the tree; every length from 1 to the longest that occurs followed by some
  token is a candidate;
* the **frequency** of a token ``x`` after a string ``w`` is
  ``count(w + x) / sum over y of count(w + y)``: among the occurrences of ``w``
  that have a next token, the share followed by ``x``;
* a draft token's **probability** is the product of the frequencies along its
  path from the match: the estimate that it and all its ancestors are right;
  a draft's **score** is the sum of its tokens' probabilities, the expected
  number of accepted tokens if the estimates were exact;
* a match of length ``m`` may propose at most ``floor(factor * m + offset)``
  tokens: a long verbatim match proposes many, a one-token match few. Tokens
  whose probability falls below ``min_token_prob`` are not proposed.

The draft kept is the best-scoring over all match lengths (ties go to the longer
match). A **path** follows the most frequent continuation (ties: the smaller
token id); a **tree** grows best first, always adding the most probable
continuation of any node it holds, so its first ``n`` nodes are the best
``n``-node tree and every parent precedes its children.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from specray.actors.drafting.suffix.tree import Cursor, SuffixTree


@dataclass(frozen=True)
class SpeculationParams:
    """How far a match of a given length may speculate, and how unlikely a
    token may be. Defaults follow the paper's reference implementation."""

    max_spec_factor: float = 1.0
    max_spec_offset: float = 0.0
    min_token_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.max_spec_factor < 0 or not 0.0 <= self.min_token_prob <= 1.0:
            raise ValueError(f"bad speculation parameters {self}")

    def max_tokens(self, match_len: int, ceiling: int) -> int:
        """Tokens a match of ``match_len`` may propose, at most ``ceiling``."""
        # A hair of slack so that e.g. 0.5 * 6 is 3, not 2.999...
        allowed = math.floor(self.max_spec_factor * match_len + self.max_spec_offset + 1e-9)
        return max(0, min(ceiling, allowed))


@dataclass(frozen=True)
class SuffixDraft:
    """A drafted chain or tree of tokens.

    ``parents[i]`` is the index of token ``i``'s parent (always ``< i``), or -1
    for a child of the context's last token; a chain has ``parents[i] = i - 1``.
    ``probs[i]`` is the estimated probability that token ``i`` and all its
    ancestors are right.
    """

    token_ids: list[int] = field(default_factory=list)
    parents: list[int] = field(default_factory=list)
    probs: list[float] = field(default_factory=list)
    match_len: int = 0
    # The most recently used sequence holding the match and the first token
    # (-1 for an empty draft): what a cache counts as used.
    source: int = -1
    from_cache: bool = False  # drawn from the global cache, not the request's own tree

    @property
    def score(self) -> float:
        return sum(self.probs)

    def conditional_probs(self) -> list[float]:
        """Per token, the estimated probability that it is right given that
        its parent is: the frequency of the step from parent to token."""
        return [
            prob if parent < 0 else prob / self.probs[parent]
            for prob, parent in zip(self.probs, self.parents, strict=True)
        ]

    def __len__(self) -> int:
        return len(self.token_ids)


def speculate(
    tree: SuffixTree,
    context: Sequence[int],
    ceiling: int,
    params: SpeculationParams,
    as_tree: bool = False,
) -> SuffixDraft:
    """The best draft of at most ``ceiling`` tokens for what follows ``context``."""
    longest = longest_match(tree, context)
    best = SuffixDraft()
    for match_len in range(longest, 0, -1):
        budget = params.max_tokens(match_len, ceiling)
        if budget <= best.score:
            break  # shorter matches are allowed no more tokens: none can beat it
        cursor = tree.locate(context[len(context) - match_len :])
        assert cursor is not None
        grow = draft_tree if as_tree else draft_path
        token_ids, parents, probs = grow(tree, cursor, budget, params.min_token_prob)
        source = _source(tree, cursor, token_ids)
        draft = SuffixDraft(token_ids, parents, probs, match_len, source)
        if draft.score > best.score:
            best = draft
    return best


def _source(tree: SuffixTree, cursor: Cursor, token_ids: list[int]) -> int:
    if not token_ids:
        return -1
    first = next(s for s in tree.successors(cursor) if s.token == token_ids[0])
    return first.cursor.node.seq


def longest_match(tree: SuffixTree, context: Sequence[int]) -> int:
    """The longest ``m < max_depth`` such that the context's last ``m`` tokens
    occur in the tree followed by some token (0: none). An occurrence at the
    very end of a sequence, such as the context matching itself in its own
    request's tree, has nothing to propose and does not count. Binary search:
    if a string occurs with a next token, so does each of its suffixes."""
    low, high = 0, min(len(context), tree.max_depth - 1)
    while low < high:
        middle = (low + high + 1) // 2
        cursor = tree.locate(context[len(context) - middle :])
        if cursor is None or next(tree.successors(cursor), None) is None:
            high = middle - 1
        else:
            low = middle
    return low


def draft_path(
    tree: SuffixTree, cursor: Cursor, budget: int, min_token_prob: float
) -> tuple[list[int], list[int], list[float]]:
    """Follow the most frequent continuation from ``cursor``."""
    token_ids: list[int] = []
    probs: list[float] = []
    prob = 1.0
    while len(token_ids) < budget:
        successors = list(tree.successors(cursor))
        if not successors:
            break
        total = sum(s.count for s in successors)
        best = min(successors, key=lambda s: (-s.count, s.token))
        prob *= best.count / total
        if prob < min_token_prob:
            break
        token_ids.append(best.token)
        probs.append(prob)
        cursor = best.cursor
    return token_ids, list(range(-1, len(token_ids) - 1)), probs


def draft_tree(
    tree: SuffixTree, cursor: Cursor, budget: int, min_token_prob: float
) -> tuple[list[int], list[int], list[float]]:
    """Grow a tree best first from ``cursor``: the most probable frontier
    token is added next (ties: first pushed)."""
    token_ids: list[int] = []
    parents: list[int] = []
    probs: list[float] = []
    # (-probability, push order, token, cursor after it, parent index)
    frontier: list[tuple[float, int, int, Cursor, int]] = []
    pushed = 0

    def expand(at: Cursor, prob: float, parent: int) -> None:
        nonlocal pushed
        successors = list(tree.successors(at))
        total = sum(s.count for s in successors)
        for s in sorted(successors, key=lambda s: (-s.count, s.token)):
            child_prob = prob * s.count / total
            if child_prob >= min_token_prob:
                heapq.heappush(frontier, (-child_prob, pushed, s.token, s.cursor, parent))
                pushed += 1

    expand(cursor, 1.0, -1)
    while frontier and len(token_ids) < budget:
        neg_prob, _, token, after, parent = heapq.heappop(frontier)
        token_ids.append(token)
        parents.append(parent)
        probs.append(-neg_prob)
        expand(after, -neg_prob, len(token_ids) - 1)
    return token_ids, parents, probs
