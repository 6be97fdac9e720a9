"""A depth-bounded, path-compressed suffix tree over several token sequences.

Terms:

* a **suffix** ``σ(s, i)`` is ``seqs[s][i : i + max_depth]``: the tokens of
  sequence ``s`` from position ``i``, cut at ``max_depth`` (and at the end of
  the sequence, so the last few suffixes of a growing sequence are *open*:
  they get longer as tokens are appended);
* the tree is the compacted trie of every suffix of every sequence; each
  **node** is reached by an edge whose label is a run of tokens, stored as a
  reference ``(seq, start, length)`` into one sequence holding it;
* a node's **count** is the number of suffixes whose path passes through or
  ends at it, which equals the number of occurrences of the node's string (of
  every string on its incoming edge) in the sequences, for strings of at most
  ``max_depth`` tokens. Every suffix ends exactly at a node, never inside an
  edge, so counts are uniform along an edge; a node with no suffix ending at it
  and a single child is merged into that child.

Appending a token to a sequence grows its open suffixes by one token. Once a
suffix occurs only once (a new count-1 leaf), every later token extends it in
place, so its leaf is given its final length up front (the label of such an
*open leaf* may run past the end of its sequence; reads stop at the end) and it
leaves the open list. Only open suffixes that still occur elsewhere cost work:
an append takes ``O(r)`` dictionary steps where ``r < max_depth`` is the length
of the longest suffix of the sequence that occurred before (small on fresh
text, up to ``max_depth`` while text is being copied). Closing a sequence cuts
its open leaves to the sequence's end.

**References and removal.** Each node's label refers to the occurrence of the
most recently used sequence that passes through it (sequences are used when
inserted and when :meth:`SuffixTree.refresh` is called). Removing the least
recently used sequence then never leaves a surviving node that refers to it:
such a node would carry only suffixes of that sequence, and their removal
drops its count to zero. :class:`specray.actors.drafting.suffix.cache.SuffixCache`
keeps that order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass


class _Node:
    """A tree node; its incoming edge is ``seqs[seq][start : start + length]``."""

    __slots__ = ("children", "count", "length", "parent", "seq", "start")

    def __init__(self, parent: _Node | None, seq: int, start: int, length: int, count: int) -> None:
        self.parent = parent
        self.seq = seq
        self.start = start
        self.length = length
        self.count = count
        # None for a leaf: most nodes are leaves and an empty dict costs 64 bytes.
        self.children: dict[int, _Node] | None = None


@dataclass(frozen=True)
class Cursor:
    """A point in the tree: ``offset`` tokens into the edge of ``node``
    (``1 <= offset <= node.length``; for the root, 0)."""

    node: _Node
    offset: int


@dataclass(frozen=True)
class Successor:
    """One token that follows a cursor, how often, and the cursor after it."""

    token: int
    count: int
    cursor: Cursor


class SuffixTree:
    """Suffixes of many sequences, their occurrence counts, and continuations."""

    def __init__(self, max_depth: int) -> None:
        if max_depth < 2:
            raise ValueError(f"max_depth must be at least 2, got {max_depth}")
        self.max_depth = max_depth
        self._root = _Node(None, -1, 0, 0, 0)
        self._seqs: dict[int, list[int]] = {}
        # Per open sequence, the node where each open suffix that still occurs
        # elsewhere ends, longest first; these start at consecutive positions
        # ending at the sequence's last token.
        self._open: dict[int, list[_Node]] = {}
        # Per open sequence, its leaves whose label runs past its end, in order
        # of where they end.
        self._open_leaves: dict[int, deque[_Node]] = {}
        self._next_id = 0

    @property
    def num_tokens(self) -> int:
        """Tokens in all sequences (the number of suffixes)."""
        return self._root.count

    def sequence(self, seq_id: int) -> list[int]:
        """The tokens of a sequence (the tree's own list: do not modify)."""
        return self._seqs[seq_id]

    def new_sequence(self) -> int:
        """Start an empty open sequence and return its id."""
        seq_id = self._next_id
        self._next_id += 1
        self._seqs[seq_id] = []
        self._open[seq_id] = []
        self._open_leaves[seq_id] = deque()
        return seq_id

    def close(self, seq_id: int) -> None:
        """No more tokens will be appended to ``seq_id``."""
        self._open.pop(seq_id, None)
        end = len(self._seqs[seq_id])
        for leaf in self._open_leaves.pop(seq_id, ()):
            leaf.length = min(leaf.length, end - leaf.start)

    def extend(self, seq_id: int, tokens: Sequence[int]) -> None:
        """Append ``tokens`` to the open sequence ``seq_id``."""
        if seq_id not in self._open:
            raise ValueError(f"sequence {seq_id} is not open")
        for token in tokens:
            self._append(seq_id, int(token))

    def count(self, pattern: Sequence[int]) -> int:
        """Occurrences of ``pattern`` (at most ``max_depth`` tokens) in all sequences."""
        if not pattern:
            return self.num_tokens
        cursor = self.locate(pattern)
        return 0 if cursor is None else cursor.node.count

    def locate(self, pattern: Sequence[int]) -> Cursor | None:
        """Where ``pattern`` ends in the tree, or None if it does not occur."""
        if len(pattern) > self.max_depth:
            raise ValueError(f"patterns are at most {self.max_depth} tokens, got {len(pattern)}")
        pattern = list(pattern)
        node, pos, taken = self._root, 0, 0
        while pos < len(pattern):
            child = node.children.get(pattern[pos]) if node.children else None
            if child is None:
                return None
            taken = min(child.length, len(pattern) - pos)
            label = self._seqs[child.seq][child.start : child.start + taken]
            if label != pattern[pos : pos + taken]:
                return None
            pos += taken
            node = child
        return Cursor(node, taken)

    def successors(self, cursor: Cursor) -> Iterator[Successor]:
        """The tokens that follow ``cursor`` with their counts, in child order.

        Inside an edge there is exactly one, with the edge's count: no suffix
        ends inside an edge.
        """
        node, offset = cursor.node, cursor.offset
        if offset < node.length:
            tokens = self._seqs[node.seq]
            if node.start + offset < len(tokens):  # else: the end of an open leaf
                yield Successor(tokens[node.start + offset], node.count, Cursor(node, offset + 1))
            return
        for token, child in (node.children or {}).items():
            yield Successor(token, child.count, Cursor(child, 1))

    def next_counts(self, pattern: Sequence[int]) -> dict[int, int]:
        """``{token: occurrences of pattern + [token]}`` (empty if none)."""
        cursor = self.locate(pattern) if pattern else Cursor(self._root, 0)
        if cursor is None or len(pattern) >= self.max_depth:
            return {}
        return {s.token: s.count for s in self.successors(cursor)}

    def refresh(self, seq_id: int) -> None:
        """Make ``seq_id`` the most recently used sequence: every node its
        suffixes pass through refers to it from now on."""
        tokens = self._seqs[seq_id]
        for i in range(len(tokens)):
            node, pos, end = self._root, i, min(i + self.max_depth, len(tokens))
            while pos < end:
                assert node.children is not None
                node = node.children[tokens[pos]]
                node.seq, node.start = seq_id, pos
                pos += node.length

    def remove(self, seq_id: int) -> None:
        """Remove a closed sequence; it must be the least recently used one
        (see the module docstring)."""
        if seq_id in self._open:
            raise ValueError(f"sequence {seq_id} is still open")
        tokens = self._seqs[seq_id]
        root = self._root
        for i in range(len(tokens)):
            root.count -= 1
            node, pos, end = root, i, min(i + self.max_depth, len(tokens))
            while pos < end:
                assert node.children is not None
                child = node.children[tokens[pos]]
                child.count -= 1
                if child.count == 0:
                    # Only this suffix went through it: its subtree goes too.
                    del node.children[tokens[pos]]
                    if not node.children:
                        node.children = None
                    break
                pos += child.length
                node = child
            # The last node kept may have lost its only ending suffix or a child.
            self._merge_into_child(node)
        del self._seqs[seq_id]

    def _append(self, seq_id: int, token: int) -> None:
        tokens = self._seqs[seq_id]
        position = len(tokens)
        tokens.append(token)
        ends = self._open[seq_id]
        ends.append(self._root)
        self._root.count += 1
        first_start = position - len(ends) + 1
        for k, end in enumerate(ends):
            ends[k] = node = self._grow(end, seq_id, position, token)
            if node.count == 1:
                # Now unique, and so is every longer suffix: a leaf that gets
                # its final length (to max_depth) and needs no more work.
                node.length = first_start + k + self.max_depth - position
                self._open_leaves[seq_id].append(node)
        done = sum(1 for node in ends if node.count == 1)  # a prefix: the longest
        if len(ends) - done >= self.max_depth:
            done += 1  # the longest reached max_depth tokens: complete
        del ends[:done]
        leaves = self._open_leaves[seq_id]
        while leaves and leaves[0].start + leaves[0].length <= len(tokens):
            leaves.popleft()

    def _grow(self, end: _Node, seq_id: int, position: int, token: int) -> _Node:
        """Extend a suffix that ends at ``end`` and occurs elsewhere too by
        ``token`` (at ``position`` of ``seq_id``); return the node it ends at now."""
        child = end.children.get(token) if end.children else None
        if child is None:
            leaf = _Node(end, seq_id, position, 1, 1)
            if end.children is None:
                end.children = {}
            end.children[token] = leaf
            return leaf
        if child.length > 1:
            # Split the edge after its first token: the suffix ends there.
            middle = _Node(end, seq_id, position, 1, child.count)
            child.start += 1
            child.length -= 1
            child.parent = middle
            middle.children = {self._seqs[child.seq][child.start]: child}
            assert end.children is not None
            end.children[token] = middle
            child = middle
        child.count += 1
        child.seq, child.start = seq_id, position - child.length + 1
        self._merge_into_child(end)
        return child

    def _merge_into_child(self, node: _Node) -> None:
        """Merge ``node`` into its only child if no suffix ends at it."""
        if node is self._root or node.children is None or len(node.children) != 1:
            return
        (child,) = node.children.values()
        if child.count != node.count:
            return
        parent = node.parent
        assert parent is not None and parent.children is not None
        child.start -= node.length
        child.length += node.length
        child.parent = parent
        parent.children[self._seqs[child.seq][child.start]] = child

    def check(self) -> None:
        """Assert the structural invariants (for tests): counts, labels,
        compaction and references."""
        stack = [self._root]
        while stack:
            node = stack.pop()
            children = node.children
            assert children is None or children, "empty children dict"
            below = 0
            for token, child in (children or {}).items():
                assert child.parent is node, "wrong parent"
                assert child.length >= 1 and child.count >= 1
                assert child.seq in self._seqs, "reference to a removed sequence"
                label = self._seqs[child.seq][child.start : child.start + child.length]
                # Only the leaves of open sequences may run past the end.
                whole = len(label) == child.length or child.seq in self._open_leaves
                assert whole and label and label[0] == token, "bad label"
                below += child.count
                stack.append(child)
            assert below <= node.count, "children outnumber their parent"
            if node is not self._root and children is not None and len(children) == 1:
                assert below < node.count, "uncompacted node"
