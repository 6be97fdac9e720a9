"""The one small Protocol every drafter implements.

A drafter tracks, per request, the committed tokens (prompt plus verified
output). Each round the engine asks it for up to ``num_tokens`` proposals,
verifies them with the target, and then tells the drafter what was committed
via :meth:`Drafter.accept`, which is also where a drafter rolls back any state
it built for rejected proposals.

Hidden-state-conditioned drafters (EAGLE / DFlash / DSpark style) name the
target layers they read in ``hidden_layers``; the engine then asks the target
for those layers and passes the hidden states of the newly committed positions
to :meth:`Drafter.accept`.

A drafter with a cache of its own (a draft model, a head) must feed every
committed token before it drafts from it; it feeds lazily, on its next
proposal, so rounds without drafts cost it nothing and the first proposal
after them feeds the whole stretch. :class:`CatchesUp` lets a scheduler
price that: how long feeding ``n`` tokens takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from specray.actors.drafting.confidence_map import ConfidenceMap
from specray.actors.sampling.params import SamplingParams


@dataclass(frozen=True)
class DraftStop:
    """When a model drafter stops drafting a request: llama.cpp's
    ``--spec-draft-p-min``, with the threshold set by the round's measured
    costs instead of a constant.

    A draft is worth verifying when it raises the round's expected tokens
    per second. Draft ``j`` (1 = the first) whose path survives with
    probability ``s`` (the product of the drafter's confidences along it)
    adds ``s`` expected tokens and moves the round from ``round_seconds[j -
    1]`` to ``round_seconds[j]``, ``E`` being the tokens the round expects
    without it. Two questions are asked of it, because its confidence is
    known only once the model step that makes it has run:

    - :meth:`tries`, before that step: could draft ``j`` pay were it
      certain given its parent (``s`` its parent's survival)? If not, no
      survival it could have would pay, and the step is not run.
    - :meth:`keeps`, after it: is it worth verifying, now that its step is
      paid for whichever way? Dropped, the round still costs its step
      (``draft_seconds[j] - draft_seconds[j - 1]``).

    Asked only once the step had run (as llama.cpp's ``p-min`` does), a
    stop cost a wasted step in every round it ended; timed against the
    drafts kept, those steps made a 0.5B draft model read twice its cost.

    The first draft is always made and kept: the scheduler chose to draft
    at all, with a catch-up feed's cost spread over the rounds left, which
    one round's seconds cannot see. The rule reads only the drafter's own
    outputs, so acceptance stays lossless; those outputs are read through
    ``calibration``, what the scheduler saw such confidences to be worth.
    """

    round_seconds: tuple[float, ...]  # [most drafts + 1]: the round with j of this request's drafts
    others_expected: float = 0.0  # tokens the rest of the batch is expected to commit
    # [most drafts + 1] or (): the drafter's share of round_seconds (() : its steps cost nothing)
    draft_seconds: tuple[float, ...] = ()
    # What the drafter's confidences were seen to be worth (None: taken as they are)
    calibration: ConfidenceMap | None = None

    def __post_init__(self) -> None:
        if self.draft_seconds and len(self.draft_seconds) != len(self.round_seconds):
            raise ValueError(
                f"draft_seconds has {len(self.draft_seconds)} entries for "
                f"{len(self.round_seconds)} round_seconds"
            )

    def tries(self, depth: int, expected: float, survival: float) -> bool:
        """Whether the step that makes draft ``depth`` is worth running,
        ``survival`` being its parent's (1 for the first draft) and
        ``expected`` this request's expected tokens from the drafts before
        it (its committed token included)."""
        if depth >= len(self.round_seconds):
            return False
        if depth == 1:
            return True
        return self._pays(depth, expected, survival, self.round_seconds[depth - 1])

    def keeps(self, depth: int, expected: float, survival: float) -> bool:
        """Whether draft ``depth``, made, is worth verifying."""
        if depth >= len(self.round_seconds):
            return False
        if depth == 1:
            return True
        step = (
            self.draft_seconds[depth] - self.draft_seconds[depth - 1] if self.draft_seconds else 0.0
        )
        return self._pays(depth, expected, survival, self.round_seconds[depth - 1] + step)

    def _pays(self, depth: int, expected: float, survival: float, without: float) -> bool:
        """(E + s) / T[depth] >= E / ``without``, the round's seconds without it."""
        before = self.others_expected + expected
        return (before + survival) * without >= before * self.round_seconds[depth]


class DraftStopping:
    """One propose call's running survivals, for drafters that step a
    batch of requests token by token and stop each by its :class:`DraftStop`."""

    def __init__(self, requests: Sequence[DraftRequest]) -> None:
        self._stops = [r.stop for r in requests]
        self._survival = [1.0] * len(requests)
        self._expected = [1.0] * len(requests)
        self.dropped = [0] * len(requests)  # per request: a draft made, then dropped

    def tries(self, index: int, depth: int) -> bool:
        """Whether request ``index`` should run the step that makes its draft ``depth``."""
        stop = self._stops[index]
        return stop is None or stop.tries(depth, self._expected[index], self._survival[index])

    def keeps(self, index: int, depth: int, confidence: float) -> bool:
        """Whether request ``index`` keeps its draft ``depth`` of this
        ``confidence`` (its probability given the drafts before it), read
        through the stop rule's calibration."""
        stop = self._stops[index]
        if stop is not None and stop.calibration is not None:
            confidence = stop.calibration(confidence)
        survival = self._survival[index] * min(max(confidence, 0.0), 1.0)
        if stop is not None and not stop.keeps(depth, self._expected[index], survival):
            self.dropped[index] = 1
            return False
        self._survival[index] = survival
        self._expected[index] += survival
        return True


@dataclass(frozen=True)
class DraftRequest:
    """One request's share of a propose call."""

    request_id: str
    num_tokens: int  # γ for this round; the drafter may return fewer
    # Tokens a drafter that can copy from the context (n-gram lookup) may
    # propose that way when it finds a match: copying costs no model step,
    # so a scheduler can allow it more than the drafts a model would make.
    lookup_tokens: int = 0
    # The most committed tokens a drafter with a cache may feed in this call
    # (None: all it has not seen). One further behind feeds this many and
    # proposes nothing: a long prompt catches up over several rounds, each
    # as short as a prefill chunk of the target.
    max_feed: int | None = None
    # A model drafter stops before ``num_tokens`` where the next draft is
    # not worth its cost (None: it drafts them all).
    stop: DraftStop | None = None

    @property
    def most(self) -> int:
        """The most tokens any proposal may have."""
        return max(self.num_tokens, self.lookup_tokens)


@dataclass
class DraftProposal:
    """Tokens a drafter proposes for one request: a chain, or a token tree.

    ``draft_probs`` is the distribution each token was sampled from, after the
    request's sampling parameters were applied. ``None`` means each token was
    proposed deterministically (a point mass), as n-gram lookup does and as
    any drafter does under greedy sampling.

    ``parents`` makes the proposal a **tree**: ``parents[i]`` is the index of
    token ``i``'s parent, always ``< i``, or -1 for a child of the last
    committed token. ``None`` is a chain (token ``i``'s parent is ``i - 1``).
    In a tree, ``draft_probs[i]`` is what token ``i`` was drawn from given its
    ancestors and the siblings before it.

    ``confidence[i]``, when a drafter gives it, is its estimate that token
    ``i`` survives verification given that its parent did (DSpark's
    confidence head, a suffix path's frequency, a draft model's probability);
    the product along a path is the chance the whole path is accepted.

    ``evidence`` names the kind of evidence a copy rests on (a suffix match's
    tree and length class; n-gram lookup is one kind): copies of one kind
    tend to fare alike, so a verify budget learns their acceptance per kind.

    ``dropped`` counts drafts a chained model made and then dropped (its
    stop rule, :meth:`DraftStop.keeps`): their steps were run, and a draft
    model's cache holds them, so a scheduler times and tracks the call by
    ``len + dropped`` steps.
    """

    token_ids: list[int]
    draft_probs: torch.Tensor | None = None  # [len(token_ids), vocab] float32
    # Copied from the context: no model fed anything for it, so a drafter
    # that keeps a cache fell one more round behind (see CatchesUp).
    from_lookup: bool = False
    parents: list[int] | None = None  # [len(token_ids)]; None: a chain
    confidence: list[float] | None = None  # [len(token_ids)]
    evidence: str = ""
    dropped: int = 0

    def __post_init__(self) -> None:
        for name, values in (("parents", self.parents), ("confidence", self.confidence)):
            if values is not None and len(values) != len(self.token_ids):
                raise ValueError(f"{name} has {len(values)} entries for {len(self)} tokens")
        if self.parents is not None and any(not -1 <= p < i for i, p in enumerate(self.parents)):
            raise ValueError(f"every parent must precede its child, got {self.parents}")

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def model_steps(self) -> int:
        """Drafts its chained model steps made: the ones it proposes and the
        ones it dropped."""
        return len(self) + self.dropped

    @property
    def node_parents(self) -> list[int]:
        """Each token's parent index (-1: the last committed token), a
        chain's included."""
        if self.parents is not None:
            return self.parents
        return list(range(-1, len(self) - 1))

    @property
    def is_tree(self) -> bool:
        """Whether some token is not the child of the one before it."""
        return self.parents is not None and any(p != i - 1 for i, p in enumerate(self.parents))

    def main_chain(self) -> DraftProposal:
        """The chain from the root through each node's first child: all of a
        chain, and of a tree the branch a best-first drafter ranks first
        (what a target that verifies chains only is sent)."""
        if not self.is_tree:
            return self
        assert self.parents is not None
        nodes: list[int] = []
        for i, parent in enumerate(self.parents):
            if parent == (nodes[-1] if nodes else -1):
                nodes.append(i)
        return DraftProposal(
            [self.token_ids[i] for i in nodes],
            None if self.draft_probs is None else self.draft_probs[nodes],
            self.from_lookup,
            None,
            None if self.confidence is None else [self.confidence[i] for i in nodes],
            self.evidence,
        )

    def clipped(self, num_tokens: int) -> DraftProposal:
        """At most ``num_tokens`` of it: a drafter may return fewer tokens
        than asked, never more. A tree keeps its first ``num_tokens`` nodes
        (a node budget, not a depth): parents precede children, so they form
        a tree again, and a drafter that grows trees best first orders its
        nodes by value. A model's drafts cut off count as ``dropped``: they
        were made."""
        if len(self) <= num_tokens:
            return self
        n = num_tokens
        return DraftProposal(
            self.token_ids[:n],
            None if self.draft_probs is None else self.draft_probs[:n],
            self.from_lookup,
            None if self.parents is None else self.parents[:n],
            None if self.confidence is None else self.confidence[:n],
            self.evidence,
            self.dropped + (0 if self.from_lookup else len(self) - n),
        )


@dataclass(frozen=True)
class DraftPaths:
    """How a drafter drafts: with a model (each draft a model step, after
    feeding the committed tokens it has not seen: see :class:`CatchesUp`),
    by copying from the context (``from_lookup`` proposals: no model step),
    or both, as the hybrid does. A scheduler prices the two apart."""

    model: bool
    lookup: bool
    # Drafts one model step yields: 1 for a chained drafter (each draft a
    # step), the block for a block drafter (DSpark drafts γ in one forward),
    # so a scheduler prices γ drafts as ceil(γ / block) steps.
    block: int = 1
    # Whether a request new to the drafter is first fed every committed
    # token (a draft model reads the prompt). A drafter of the target's
    # hidden states starts from the rows the target ships after the prompt,
    # so it has one row to feed, not the prompt.
    reads_prompt: bool = True

    def __post_init__(self) -> None:
        if self.block < 1:
            raise ValueError(f"block must be >= 1, got {self.block}")


@dataclass(frozen=True)
class DraftUpdate:
    """What a drafter must hear about one request after a round (what
    :meth:`Drafter.accept` takes). Updates ride on the drafter's next
    proposal, so a round costs one message each way."""

    request_id: str
    num_accepted: int
    new_token_ids: list[int]
    target_hidden: torch.Tensor | None = None  # [len(new_token_ids), hidden] or None

    def __post_init__(self) -> None:
        # The accepted drafts are a prefix of the round's committed tokens.
        if not 0 <= self.num_accepted <= len(self.new_token_ids):
            raise ValueError(
                f"num_accepted={self.num_accepted} out of range for "
                f"{len(self.new_token_ids)} new tokens"
            )

    def hidden_rows(self, width: int) -> torch.Tensor | None:
        """``target_hidden``, checked to hold a ``width``-wide row per new
        token; None where the target sent none (a gap in the context)."""
        rows = self.target_hidden
        if rows is not None and rows.shape != (len(self.new_token_ids), width):
            raise ValueError(
                f"target_hidden has shape {tuple(rows.shape)}, expected "
                f"({len(self.new_token_ids)}, {width})"
            )
        return rows


class Drafter(Protocol):
    """What the engine needs from any drafter."""

    name: str
    # Target layers whose hidden states this drafter reads; () for none.
    hidden_layers: tuple[int, ...]
    paths: DraftPaths

    def start(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        """Begin tracking a request whose committed tokens are ``prompt_ids``."""

    def propose(self, requests: Sequence[DraftRequest]) -> list[DraftProposal]:
        """Propose up to ``num_tokens`` tokens for each request, in order."""

    def accept(self, update: DraftUpdate) -> None:
        """Record one verified round of ``update.request_id``.

        ``new_token_ids`` are all tokens committed this round: the first
        ``num_accepted`` of the last proposal, then the recovered or bonus
        token. ``target_hidden`` is ``[len(new_token_ids), len(hidden_layers)
        * hidden_size]`` when ``hidden_layers`` is non-empty: row ``i`` is the
        target's hidden state (layers concatenated in ``hidden_layers``
        order) at the position whose output is ``new_token_ids[i]``, i.e. the
        position of the token just before it.
        """

    def finish(self, request_id: str) -> None:
        """Free all state of a request (finished, cancelled or migrated)."""


@runtime_checkable
class CatchesUp(Protocol):
    """A drafter whose next proposal first feeds the committed tokens it has
    not seen (the whole prompt for a new request, every token of a stretch
    without drafts), and that can say what feeding costs."""

    def feed_profile(self, sizes: Sequence[int]) -> list[tuple[int, float]]:
        """Seconds to feed ``n`` tokens of one request, for each ``n`` in
        ``sizes`` (best of a few, back to back): the shape of its catch-up
        cost. Needs one free request slot."""


@runtime_checkable
class RunsModels(Protocol):
    """A drafter that computes with torch modules: the ones a replica counts
    the forwards of, so that a long proposal (a catch-up under load) shows
    it is computing rather than hung."""

    def models(self) -> Sequence[torch.nn.Module]: ...


@runtime_checkable
class SharesPrefixes(Protocol):
    """A drafter whose cache shares prefixes across requests (a draft model
    with a prefix cache): the pins its requests hold, 0 once none runs."""

    @property
    def prefix_pins(self) -> int: ...
