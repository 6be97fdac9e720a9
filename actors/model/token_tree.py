"""Token trees as flat parent lists, the shape verification and acceptance share.

A tree of ``n`` draft tokens is ``parents``: ``parents[i]`` is the index of
node ``i``'s parent, always ``< i`` (so every prefix of the list is a tree
again), or -1 when node ``i`` follows the last committed token (the **root**,
which is not a node). A chain is ``[-1, 0, 1, ...]``. A node's **depth** is
its distance from the root minus one: the children of the root have depth 0,
so a node at depth ``d`` sits where the ``d``-th draft token of a chain would.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def check_parents(parents: Sequence[int]) -> None:
    """Raise ValueError unless every parent precedes its child."""
    for i, parent in enumerate(parents):
        if not -1 <= parent < i:
            raise ValueError(f"node {i} has parent {parent}; parents must precede children")


def depths(parents: Sequence[int]) -> list[int]:
    """Depth of every node (0 for children of the root)."""
    result: list[int] = []
    for parent in parents:
        result.append(0 if parent < 0 else result[parent] + 1)
    return result


def children(parents: Sequence[int]) -> list[list[int]]:
    """``children(parents)[p + 1]``: the children of node ``p`` (index 0: of
    the root), in index order."""
    result: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for i, parent in enumerate(parents):
        result[parent + 1].append(i)
    return result


def path_to(parents: Sequence[int], node: int) -> list[int]:
    """Nodes from the root's child down to ``node`` (empty for ``node = -1``)."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def is_chain(parents: Sequence[int]) -> bool:
    return all(parent == i - 1 for i, parent in enumerate(parents))


def ancestor_mask(parents: Sequence[int]) -> torch.Tensor:  # [n, n] bool
    """``[i, j]``: node ``j`` is node ``i`` or one of its ancestors, i.e. what
    the query of node ``i`` may attend to among the tree's nodes."""
    n = len(parents)
    mask = torch.eye(n, dtype=torch.bool)
    for i, parent in enumerate(parents):
        if parent >= 0:
            mask[i] |= mask[parent]
    return mask
