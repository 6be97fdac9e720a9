"""Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

For one request with ``k`` draft tokens ``x_0 .. x_{k-1}``, draft
distributions ``draft_probs[i]`` (what ``x_i`` was sampled from) and target
distributions ``target_probs[0 .. k]`` (``target_probs[i]`` is the target's
distribution for the token at draft position ``i``; ``target_probs[k]`` is the
one after the last draft):

* **accepted** tokens are the longest prefix of drafts that survive the test
  ``u_i < target_probs[i][x_i] / draft_probs[i][x_i]`` with ``u_i ~ U[0, 1)``;
* the **recovered** token is sampled, at the first rejected position ``j``,
  from the normalised residual ``max(target_probs[j] - draft_probs[j], 0)``;
* the **bonus** token is sampled from ``target_probs[k]`` when all ``k``
  drafts are accepted.

Each request emits its accepted tokens plus exactly one recovered or bonus
token, and the emitted sequence is distributed exactly as if it had been
sampled from the target alone. A request with no drafts simply samples one
token from ``target_probs[0]``.

A draft without probabilities (``None``: n-gram lookup, or any greedy drafter)
is a point mass on its token: it is accepted with probability
``target_probs[i][x_i]`` and the residual is the target with ``x_i`` removed.

Greedy requests take a fast path without random draws: drafts are accepted
while they equal the target argmax, which is then emitted. This is what the
general rule gives for one-hot target distributions.

Randomness: each random request draws, from its own generator only, exactly
``num_draft_tokens + 1`` uniforms per call in one fixed order (the acceptance
uniforms for positions ``0 .. k-1``, then the one for the recovered or bonus
token), so its output depends only on its seed and its own inputs, never on
the other requests in the batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftBatch:
    """The drafts of a batch of requests, padded to the longest.

    Rows flagged ``point_mass`` ignore their slice of ``probs``; ``probs`` is
    None when every row is a point mass.
    """

    token_ids: torch.Tensor  # [batch, max_k] int64; padding is ignored
    num_tokens: torch.Tensor  # [batch] int64, each in [0, max_k]
    probs: torch.Tensor | None  # [batch, max_k, vocab] float32
    point_mass: torch.Tensor  # [batch] bool

    @property
    def batch_size(self) -> int:
        return int(self.token_ids.shape[0])

    @property
    def max_k(self) -> int:
        return int(self.token_ids.shape[1])

    @classmethod
    def from_proposals(
        cls,
        token_ids: Sequence[Sequence[int]],
        probs: Sequence[torch.Tensor | None],  # each [len(token_ids[i]), vocab] float32
        device: torch.device | str = "cpu",
    ) -> DraftBatch:
        """Pad per-request proposals (as in ``DraftProposal``) into one batch."""
        if len(token_ids) != len(probs):
            raise ValueError("token_ids and probs must have one entry per request")
        batch = len(token_ids)
        max_k = max((len(t) for t in token_ids), default=0)
        padded = torch.zeros(batch, max_k, dtype=torch.int64)
        for row, ids in enumerate(token_ids):
            padded[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.int64)
        point_mass = [p is None for p in probs]
        batch_probs: torch.Tensor | None = None
        given = [p for p in probs if p is not None]
        if given:
            vocab = int(given[0].shape[-1])
            batch_probs = torch.zeros(batch, max_k, vocab, dtype=torch.float32, device=device)
            for row, row_probs in enumerate(probs):
                if row_probs is None:
                    continue
                if tuple(row_probs.shape) != (len(token_ids[row]), vocab):
                    raise ValueError(
                        f"draft probs of request {row} have shape {tuple(row_probs.shape)}, "
                        f"expected {(len(token_ids[row]), vocab)}"
                    )
                batch_probs[row, : len(token_ids[row])] = row_probs.to(device, torch.float32)
        return cls(
            token_ids=padded.to(device),
            num_tokens=torch.tensor([len(t) for t in token_ids], dtype=torch.int64, device=device),
            probs=batch_probs,
            point_mass=torch.tensor(point_mass, dtype=torch.bool, device=device),
        )

    def select(self, rows: torch.Tensor) -> DraftBatch:  # rows: [m] int64
        """The sub-batch of the given rows, in that order."""
        return DraftBatch(
            token_ids=self.token_ids.index_select(0, rows),
            num_tokens=self.num_tokens.index_select(0, rows),
            probs=None if self.probs is None else self.probs.index_select(0, rows),
            point_mass=self.point_mass.index_select(0, rows),
        )


@dataclass(frozen=True)
class VerifyOutcome:
    """Vectorised result of one verification, as device tensors."""

    num_accepted: torch.Tensor  # [batch] int64
    final_token_ids: torch.Tensor  # [batch] int64; the recovered or bonus token


@dataclass(frozen=True)
class PositionAcceptance:
    """Per draft position: how many requests drafted it and how many kept it."""

    drafted: list[int]
    accepted: list[int]


@dataclass(frozen=True)
class RejectionResult:
    """What each request emits this round."""

    output_token_ids: list[list[int]]  # accepted drafts, then the recovered or bonus token
    num_accepted: list[int]
    num_draft_tokens: list[int]

    @property
    def is_bonus(self) -> list[bool]:
        """Whether each request's last token is a bonus (all drafts accepted)."""
        return [a == k for a, k in zip(self.num_accepted, self.num_draft_tokens, strict=True)]

    def acceptance_by_position(self) -> PositionAcceptance:
        """Counts per draft position, for acceptance-rate metrics."""
        max_k = max(self.num_draft_tokens, default=0)
        drafted = [sum(k > i for k in self.num_draft_tokens) for i in range(max_k)]
        accepted = [sum(a > i for a in self.num_accepted) for i in range(max_k)]
        return PositionAcceptance(drafted=drafted, accepted=accepted)


def rejection_sample(
    draft: DraftBatch,
    target_probs: torch.Tensor | None,  # [batch, max_k + 1, vocab] float32
    greedy: Sequence[bool],
    generators: Sequence[torch.Generator | None],
    target_argmax: torch.Tensor | None = None,  # [batch, max_k + 1] int64
) -> RejectionResult:
    """Verify every request's drafts against the target and pick its tokens.

    ``target_probs`` must come from the same processing as the draft's
    (see :func:`specray.actors.sampling.logits.compute_probs`). Greedy rows
    use ``target_argmax`` when given, else the argmax of ``target_probs``;
    ``target_probs`` may be None only if every row is greedy and
    ``target_argmax`` is given. ``generators[i]`` is used, and must be set,
    only for random rows.
    """
    batch = draft.batch_size
    if len(greedy) != batch or len(generators) != batch:
        raise ValueError("greedy and generators need one entry per request")
    device = draft.token_ids.device
    num_tokens = draft.num_tokens.tolist()
    greedy_rows = [i for i in range(batch) if greedy[i]]
    random_rows = [i for i in range(batch) if not greedy[i]]

    num_accepted = torch.zeros(batch, dtype=torch.int64, device=device)
    final_token_ids = torch.zeros(batch, dtype=torch.int64, device=device)

    if greedy_rows:
        argmax = target_argmax
        if argmax is None:
            if target_probs is None:
                raise ValueError("greedy rows need target_probs or target_argmax")
            argmax = target_probs.argmax(dim=-1)
        index = _row_index(greedy_rows, batch, device)
        if index is not None:
            outcome = greedy_verify(draft.select(index), argmax.index_select(0, index))
        else:
            outcome = greedy_verify(draft, argmax)
        _write_rows(outcome, index, num_accepted, final_token_ids)

    if random_rows:
        if target_probs is None:
            raise ValueError("random rows need target_probs")
        accept_uniforms, sample_uniforms = _draw_uniforms(
            [generators[i] for i in random_rows],
            [num_tokens[i] for i in random_rows],
            draft.max_k,
            device,
        )
        index = _row_index(random_rows, batch, device)
        sub_draft = draft if index is None else draft.select(index)
        sub_target = target_probs if index is None else target_probs.index_select(0, index)
        outcome = verify_with_uniforms(sub_draft, sub_target, accept_uniforms, sample_uniforms)
        _write_rows(outcome, index, num_accepted, final_token_ids)

    accepted_list = num_accepted.tolist()
    final_list = final_token_ids.tolist()
    draft_list = draft.token_ids.tolist()
    return RejectionResult(
        output_token_ids=[
            [*draft_list[i][: accepted_list[i]], final_list[i]] for i in range(batch)
        ],
        num_accepted=accepted_list,
        num_draft_tokens=num_tokens,
    )


def _row_index(
    rows: list[int], batch: int, device: torch.device
) -> torch.Tensor | None:  # [len(rows)] int64
    # None when the path covers the whole batch: skips copying the (large)
    # draft and target probabilities.
    if len(rows) == batch:
        return None
    return torch.tensor(rows, dtype=torch.int64, device=device)


def _write_rows(
    outcome: VerifyOutcome,
    index: torch.Tensor | None,  # [rows] int64, None for all rows
    num_accepted: torch.Tensor,  # [batch] int64, updated in place
    final_token_ids: torch.Tensor,  # [batch] int64, updated in place
) -> None:
    if index is None:
        num_accepted.copy_(outcome.num_accepted)
        final_token_ids.copy_(outcome.final_token_ids)
    else:
        num_accepted.index_copy_(0, index, outcome.num_accepted)
        final_token_ids.index_copy_(0, index, outcome.final_token_ids)


def _draw_uniforms(
    generators: Sequence[torch.Generator | None],
    num_tokens: Sequence[int],
    max_k: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:  # [rows, max_k] float64, [rows] float64
    accept = torch.ones(len(generators), max_k, dtype=torch.float64)
    sample = torch.empty(len(generators), dtype=torch.float64)
    for row, (generator, k) in enumerate(zip(generators, num_tokens, strict=True)):
        if generator is None:
            raise ValueError("every non-greedy request needs a generator")
        draws = torch.rand(k + 1, generator=generator, dtype=torch.float64)
        accept[row, :k] = draws[:k]
        sample[row] = draws[k]
    return accept.to(device), sample.to(device)


def greedy_verify(
    draft: DraftBatch,
    target_argmax: torch.Tensor,  # [batch, max_k + 1] int64
) -> VerifyOutcome:
    """Accept drafts while they equal the target argmax; emit the argmax after them."""
    positions = torch.arange(draft.max_k, device=draft.token_ids.device)
    valid = positions.unsqueeze(0) < draft.num_tokens.unsqueeze(1)  # [batch, max_k]
    matches = (draft.token_ids == target_argmax[:, : draft.max_k]) & valid
    num_accepted = matches.long().cumprod(dim=1).sum(dim=1)
    final = target_argmax.gather(1, num_accepted.unsqueeze(1)).squeeze(1)
    return VerifyOutcome(num_accepted=num_accepted, final_token_ids=final)


def verify_with_uniforms(
    draft: DraftBatch,
    target_probs: torch.Tensor,  # [batch, max_k + 1, vocab] float32
    accept_uniforms: torch.Tensor,  # [batch, max_k] float64 in [0, 1)
    sample_uniforms: torch.Tensor,  # [batch] float64 in [0, 1)
) -> VerifyOutcome:
    """The rejection-sampling math for given uniforms; :func:`rejection_sample` uses it.

    Exposed so that statistical tests can run many independent rows at once
    through the exact code path of the engine.
    """
    batch, max_k = draft.batch_size, draft.max_k
    if tuple(target_probs.shape[:2]) != (batch, max_k + 1):
        raise ValueError(
            f"target_probs {tuple(target_probs.shape)} do not match drafts ({batch}, {max_k})"
        )
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    positions = torch.arange(max_k, device=device)
    valid = positions.unsqueeze(0) < draft.num_tokens.unsqueeze(1)  # [batch, max_k]
    token_ids = torch.where(valid, draft.token_ids, 0)  # padding may hold anything

    # Acceptance test for every position at once: u * q(x) < p(x), i.e.
    # u < p(x) / q(x) without dividing; a target-impossible token never passes.
    target_at_token = target_probs[:, :max_k].gather(2, token_ids.unsqueeze(2)).squeeze(2)
    draft_at_token = _draft_prob_at_tokens(draft, token_ids)
    accepted = accept_uniforms * draft_at_token.double() < target_at_token.double()
    num_accepted = (accepted & valid).long().cumprod(dim=1).sum(dim=1)  # [batch]

    # Distribution of the final token: the target at the stop position, minus
    # the draft there when that position was a rejected draft.
    stop_target = target_probs[rows, num_accepted]  # [batch, vocab]
    rejected = num_accepted < draft.num_tokens  # [batch]
    stop_draft = _draft_probs_at_position(draft, token_ids, num_accepted, stop_target)
    residual = (stop_target - stop_draft).clamp_min(0.0)
    # Rounding can empty a residual that theory says is positive whenever a
    # rejection happens; the target is then the closest valid choice.
    residual_ok = residual.sum(dim=-1) > 0.0
    use_residual = (rejected & residual_ok).unsqueeze(1)
    final_probs = torch.where(use_residual, residual, stop_target)
    final = sample_with_uniforms(final_probs, sample_uniforms)
    return VerifyOutcome(num_accepted=num_accepted, final_token_ids=final)


def _draft_prob_at_tokens(
    draft: DraftBatch,
    token_ids: torch.Tensor,  # [batch, max_k] int64
) -> torch.Tensor:  # [batch, max_k] float32
    ones = torch.ones(token_ids.shape, dtype=torch.float32, device=token_ids.device)
    if draft.probs is None:
        return ones
    gathered = draft.probs.gather(2, token_ids.unsqueeze(2)).squeeze(2)
    return torch.where(draft.point_mass.unsqueeze(1), ones, gathered)


def _draft_probs_at_position(
    draft: DraftBatch,
    token_ids: torch.Tensor,  # [batch, max_k] int64
    position: torch.Tensor,  # [batch] int64 in [0, max_k]
    like: torch.Tensor,  # [batch, vocab] float32
) -> torch.Tensor:  # [batch, vocab] float32; zeros where position == max_k
    """Each row's draft distribution at ``position`` (only used where it was rejected)."""
    if draft.max_k == 0:
        return torch.zeros_like(like)
    clamped = position.clamp(max=draft.max_k - 1)
    rows = torch.arange(draft.batch_size, device=like.device)
    point = torch.zeros_like(like)
    point.scatter_(1, token_ids[rows, clamped].unsqueeze(1), 1.0)
    if draft.probs is None:
        return point
    return torch.where(draft.point_mass.unsqueeze(1), point, draft.probs[rows, clamped])


def sample_with_uniforms(
    probs: torch.Tensor,  # [n, vocab] float32, non-negative, each row with positive mass
    uniforms: torch.Tensor,  # [n] float64 in [0, 1)
) -> torch.Tensor:  # [n] int64
    """Inverse-CDF sampling: one uniform per row, rows need not be normalised.

    A token with zero probability is never returned.
    """
    cdf = probs.double().cumsum(dim=-1)  # [n, vocab]
    total = cdf[:, -1:].contiguous()  # [n, 1]
    # right=True: the first index whose cdf exceeds the target, so flat
    # (zero-probability) stretches are skipped.
    index = torch.searchsorted(cdf, uniforms.unsqueeze(1) * total, right=True)
    # u * total may round up to total; fall back to the last token with mass.
    last_with_mass = torch.searchsorted(cdf, total, right=False)
    return torch.minimum(index, last_with_mass).squeeze(1)
