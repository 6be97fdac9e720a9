"""Lossless acceptance of a token tree: the longest verified path, then one token.

Terms. A **tree draft** is ``n`` draft tokens with ``parents`` (see
:mod:`specray.actors.model.token_tree`); ``target_probs`` has ``n + 1`` rows:
row 0 is the target's distribution after the last committed token (the
**root**), row ``1 + i`` the one after node ``i`` (given its path). The
**draft distribution** ``q_i`` of node ``i`` is what its token was drawn from
given its ancestors and the siblings before it (``None``: a point mass on the
token, as lookup drafters and greedy drafting give).

**Greedy.** From the root, move to the first child whose token is the target's
argmax at the current node; stop where none is. The accepted path, then the
argmax at its last node (the recovered or bonus token), is emitted: what
greedy decoding with the target alone would emit.

**Sampling** (multi-draft recursive rejection, SpecInfer: Miao et al. 2024,
arXiv 2305.09781, Algorithm 2; point-mass siblings as in Sequoia, Chen et al.
2024, arXiv 2402.12374). At a node with target distribution ``p``, keep a
residual ``r = p`` and try its children ``x_1 .. x_m`` in index order:

* accept ``x_i`` with probability ``min(1, r_norm(x_i) / q_i(x_i))``, where
  ``r_norm = r / sum(r)``, and continue at node ``x_i``;
* else ``r <- max(r_norm - q_i, 0)``; for a point mass that is ``r`` with
  ``x_i`` zeroed out (``r_norm(x_i) <= 1``).

If every child is rejected, emit a token drawn from ``r`` (normalised) and
stop; at a node without children, draw the bonus token from ``p``.

*Why it is lossless.* Claim: from any sibling step ``i`` with residual
``r_i``, the token emitted at this node is distributed as ``r_i``. For the
last step it is sampled from ``r_i`` directly. Otherwise ``x_i ~ q_i`` is drawn
independently of the acceptance coins (drafts exist before verification), so
by the one-draft speculative-sampling lemma (Leviathan et al. 2023, Thm. 1)
``P(emit y) = min(q_i(y), r_i(y)) + (1 - sum_z min(q_i(z), r_i(z))) *
r_{i+1}(y) = r_i(y)``, using the claim for ``r_{i+1} = norm(r_i - min(q_i,
r_i))``. With ``r_1 = p`` the node emits exactly ``p``; after accepting ``x_i``
the next node's children were drafted given ``x_i``, so the argument repeats
one level down, and the emitted sequence follows the target. The point-mass
rule is the case ``q_i = δ(x_i)``: accept with probability ``r_norm(x_i)``, and
otherwise ``x_i`` can no longer be emitted at this node. ``q_i`` may depend on
the earlier siblings (sampling without replacement) but not on the coins.

Randomness: each random request draws exactly ``n + 1`` float64 uniforms from
its own generator per call (uniform ``i`` tests node ``i`` if it is tried, the
last draws the final token), so its output depends only on its seed and its
own inputs. On a chain this is the exact arithmetic and draw order of
:func:`specray.actors.sampling.rejection.rejection_sample`, so both give the
same tokens for the same seed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from specray.actors.model.token_tree import check_parents, children
from specray.actors.sampling.rejection import sample_with_uniforms


@dataclass(frozen=True)
class TreeDraft:
    """One request's tree: tokens, parents, and optional draft distributions."""

    token_ids: list[int]
    parents: list[int]
    draft_probs: torch.Tensor | None = None  # [n, vocab] float32; None: point masses

    def __post_init__(self) -> None:
        if len(self.parents) != len(self.token_ids):
            raise ValueError(f"{len(self.parents)} parents for {len(self.token_ids)} tokens")
        check_parents(self.parents)
        if self.draft_probs is not None and self.draft_probs.shape[0] != len(self.token_ids):
            raise ValueError(f"draft_probs has {self.draft_probs.shape[0]} rows, not {len(self)}")

    def __len__(self) -> int:
        return len(self.token_ids)

    @classmethod
    def chain(cls, token_ids: Sequence[int], draft_probs: torch.Tensor | None = None) -> TreeDraft:
        return cls(list(token_ids), list(range(-1, len(token_ids) - 1)), draft_probs)


@dataclass(frozen=True)
class TreePath:
    """What one request's tree verification keeps."""

    accepted_nodes: list[int]  # node indices, root's child first, each the parent of the next
    final_token_id: int  # the recovered token, or the bonus when the path ends at a leaf


@dataclass(frozen=True)
class TreeRejectionResult:
    """What each request emits this round."""

    output_token_ids: list[list[int]]  # tokens of the accepted path, then the final token
    accepted_nodes: list[list[int]]  # per request, see TreePath
    num_draft_tokens: list[int]  # tree sizes

    @property
    def num_accepted(self) -> list[int]:
        return [len(nodes) for nodes in self.accepted_nodes]


def tree_rejection_sample(
    drafts: Sequence[TreeDraft],
    target_probs: Sequence[torch.Tensor | None],  # each [len(draft) + 1, vocab] float32
    greedy: Sequence[bool],
    generators: Sequence[torch.Generator | None],
    target_argmax: Sequence[torch.Tensor | None] | None = None,  # each [len(draft) + 1] int64
) -> TreeRejectionResult:
    """Verify each request's tree against the target and pick its tokens.

    ``target_probs`` must come from the same processing as the drafts'
    (:func:`specray.actors.sampling.logits.compute_probs`). Greedy requests
    read ``target_argmax[i]`` when given, else the argmax of
    ``target_probs[i]``; random requests need ``target_probs[i]`` and
    ``generators[i]``.
    """
    batch = len(drafts)
    if not len(target_probs) == len(greedy) == len(generators) == batch:
        raise ValueError("target_probs, greedy and generators need one entry per request")
    paths = []
    for i, draft in enumerate(drafts):
        probs = target_probs[i]
        if greedy[i]:
            argmax = target_argmax[i] if target_argmax is not None else None
            if argmax is None:
                if probs is None:
                    raise ValueError(f"greedy request {i} needs target_probs or target_argmax")
                argmax = probs.argmax(dim=-1)
            paths.append(greedy_tree_verify(draft, argmax))
            continue
        generator = generators[i]
        if probs is None or generator is None:
            raise ValueError(f"random request {i} needs target_probs and a generator")
        uniforms = torch.rand(len(draft) + 1, generator=generator, dtype=torch.float64)
        paths.append(verify_tree_with_uniforms(draft, probs, uniforms))
    return TreeRejectionResult(
        output_token_ids=[
            [*(d.token_ids[n] for n in p.accepted_nodes), p.final_token_id]
            for d, p in zip(drafts, paths, strict=True)
        ],
        accepted_nodes=[p.accepted_nodes for p in paths],
        num_draft_tokens=[len(d) for d in drafts],
    )


def greedy_tree_verify(
    draft: TreeDraft,
    target_argmax: torch.Tensor,  # [len(draft) + 1] int64
) -> TreePath:
    """The longest path whose every token is the target's argmax, then the argmax."""
    argmax = target_argmax.tolist()

    def matching_child(row: int, kids: list[int]) -> int | _Stop:
        wanted = argmax[row]
        return next((c for c in kids if draft.token_ids[c] == wanted), _Stop(wanted))

    return _walk(draft, target_argmax.shape[0], matching_child)


def verify_tree_with_uniforms(
    draft: TreeDraft,
    target_probs: torch.Tensor,  # [len(draft) + 1, vocab] float32
    uniforms: torch.Tensor,  # [len(draft) + 1] float64 in [0, 1)
) -> TreePath:
    """The sampling rule of the module docstring for given uniforms; exposed so
    statistical tests drive the exact code path of :func:`tree_rejection_sample`."""
    draws = uniforms.tolist()

    def sampled_child(row: int, kids: list[int]) -> int | _Stop:
        target = target_probs[row]
        residual = target
        # sum(residual): 1 while it is the target row itself, which keeps a
        # chain's arithmetic identical to rejection_sample's.
        scale = 1.0
        rejected_any = False
        for child in kids:
            token = draft.token_ids[child]
            draft_at_token = 1.0
            if draft.draft_probs is not None:
                draft_at_token = float(draft.draft_probs[child, token])
            if draws[child] * draft_at_token * scale < float(residual[token]):
                return child
            residual = _without(residual, scale, child, token, draft.draft_probs)
            scale = float(residual.double().sum())
            rejected_any = True
        # Rounding can empty a residual that theory says keeps mass after a
        # rejection; the target is then the closest valid choice.
        final_probs = residual if rejected_any and scale > 0.0 else target
        return _Stop(int(sample_with_uniforms(final_probs.unsqueeze(0), uniforms[-1:])))

    return _walk(draft, target_probs.shape[0], sampled_child)


@dataclass(frozen=True)
class _Stop:
    """A node where the walk ends: no child accepted, ``token_id`` emitted."""

    token_id: int


# A node's rule, the one place greedy and sampling verification differ: from
# the node's row (0: the root, 1 + i: node i) and its children, the child it
# accepts, or where the walk stops.
_NodeRule = Callable[[int, list[int]], int | _Stop]


def _walk(draft: TreeDraft, rows: int, rule: _NodeRule) -> TreePath:
    """From the root, move to the child ``rule`` accepts until it stops."""
    _check_rows(draft, rows)
    kids = children(draft.parents)
    accepted: list[int] = []
    row = 0
    while True:
        verdict = rule(row, kids[row])
        if isinstance(verdict, _Stop):
            return TreePath(accepted, verdict.token_id)
        accepted.append(verdict)
        row = verdict + 1


def _without(
    residual: torch.Tensor,  # [vocab] float32, sums to ``scale``
    scale: float,
    child: int,
    token: int,
    draft_probs: torch.Tensor | None,  # [n, vocab] float32
) -> torch.Tensor:  # [vocab] float32: max(residual - scale * q_child, 0)
    if draft_probs is None:
        out = residual.clone()
        out[token] = 0.0  # residual[token] <= scale: a point mass removes all of it
        return out
    draft = draft_probs[child]
    return (residual - draft if scale == 1.0 else residual - scale * draft).clamp_min(0.0)


def _check_rows(draft: TreeDraft, rows: int) -> None:
    if rows != len(draft) + 1:
        raise ValueError(f"a tree of {len(draft)} tokens needs {len(draft) + 1} rows, got {rows}")
