"""Turning logits into sampling distributions, batched and per-row.

Draft and target run the *same* :func:`compute_probs` with the same
:class:`SamplingTensors`, so rejection sampling compares like with like: the
guarantee it gives is that output tokens follow the target's *processed*
distribution.

Processing order, per row:

1. temperature: ``logits / temperature``;
2. top-k: keep the ``k`` largest logits (ties with the k-th are all kept);
3. top-p: keep the smallest set of most likely tokens, under the distribution
   left by top-k, whose mass reaches ``p`` (the most likely token always stays);
4. min-p: drop tokens whose probability is below ``min_p`` times the largest
   probability, then renormalise.

Greedy rows (temperature 0) become a one-hot on the argmax, so greedy decoding
is just a special case of the same math. Every returned row sums to one: a row
that would come out empty or non-finite (``inf``/``nan`` logits) falls back to
a one-hot on its argmax.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from specray.actors.sampling.params import SamplingParams


@dataclass(frozen=True)
class SamplingTensors:
    """Per-row sampling parameters as device tensors.

    The Python flags say whether *any* row may need a filter; they let
    :func:`compute_probs` skip sorting without reading tensors back from the
    device. They may over-approximate (e.g. after :meth:`repeat_interleave`
    with zero counts), never under-approximate.
    """

    temperature: torch.Tensor  # [n] float32; 1.0 on greedy rows so division is safe
    top_k: torch.Tensor  # [n] int64; 0 disables
    top_p: torch.Tensor  # [n] float32; 1.0 disables
    min_p: torch.Tensor  # [n] float32; 0.0 disables
    greedy: torch.Tensor  # [n] bool
    all_greedy: bool
    any_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    max_top_k: int  # largest top_k over rows with top-k enabled; 0 if none

    @classmethod
    def from_params(
        cls, params: Sequence[SamplingParams], device: torch.device | str = "cpu"
    ) -> SamplingTensors:
        """One row per entry of ``params``."""
        greedy = [p.greedy for p in params]
        # Filters are irrelevant on greedy rows, so they do not force the slow path.
        temperature = [1.0 if p.greedy else p.temperature for p in params]
        top_k = [0 if p.greedy else max(p.top_k, 0) for p in params]
        top_p = [1.0 if p.greedy else _clamp_unit(p.top_p) for p in params]
        min_p = [0.0 if p.greedy else _clamp_unit(p.min_p) for p in params]
        if any(t < 0.0 for t in temperature):
            raise ValueError("temperature must be >= 0")
        return cls(
            temperature=torch.tensor(temperature, dtype=torch.float32, device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor(top_p, dtype=torch.float32, device=device),
            min_p=torch.tensor(min_p, dtype=torch.float32, device=device),
            greedy=torch.tensor(greedy, dtype=torch.bool, device=device),
            all_greedy=bool(greedy) and all(greedy),
            any_greedy=any(greedy),
            any_top_k=any(k > 0 for k in top_k),
            any_top_p=any(p < 1.0 for p in top_p),
            any_min_p=any(p > 0.0 for p in min_p),
            max_top_k=max(top_k, default=0),
        )

    def __len__(self) -> int:
        return int(self.temperature.shape[0])

    def repeat_interleave(self, counts: Sequence[int] | torch.Tensor) -> SamplingTensors:
        """Repeat row ``i`` ``counts[i]`` times, e.g. to the k+1 verify rows of a request."""
        repeats = torch.as_tensor(counts, dtype=torch.int64, device=self.temperature.device)
        # The flags stay: repeating rows adds no filter (see the class doc).
        return replace(
            self,
            temperature=self.temperature.repeat_interleave(repeats),
            top_k=self.top_k.repeat_interleave(repeats),
            top_p=self.top_p.repeat_interleave(repeats),
            min_p=self.min_p.repeat_interleave(repeats),
            greedy=self.greedy.repeat_interleave(repeats),
        )


def _clamp_unit(value: float) -> float:
    return min(max(value, 0.0), 1.0)


def compute_probs(
    logits: torch.Tensor,  # [n, vocab] any float dtype
    sampling: SamplingTensors,
) -> torch.Tensor:  # [n, vocab] float32, every row sums to 1
    """Apply temperature, top-k, top-p and min-p (in that order) and normalise."""
    if logits.dim() != 2 or logits.shape[0] != len(sampling):
        raise ValueError(f"logits {tuple(logits.shape)} do not match {len(sampling)} rows")
    logits = logits.float()
    # NaN would win argmax; treat it as "impossible" instead.
    argmax_one_hot = _one_hot_argmax(torch.nan_to_num(logits, nan=-torch.inf))
    if sampling.all_greedy:
        return argmax_one_hot

    scaled = logits / sampling.temperature.unsqueeze(1)
    if sampling.any_top_p:
        scaled = _apply_top_k_top_p_sorted(scaled, sampling)
    elif sampling.any_top_k:
        scaled = _apply_top_k_only(scaled, sampling)
    probs = torch.softmax(scaled, dim=-1)
    if sampling.any_min_p:
        probs = _apply_min_p(probs, sampling.min_p)
    if sampling.any_greedy:
        probs = torch.where(sampling.greedy.unsqueeze(1), argmax_one_hot, probs)

    # Never return an empty or non-finite row; checked without a device sync.
    row_sum = probs.sum(dim=-1, keepdim=True)
    bad = ~torch.isfinite(row_sum) | (row_sum <= 0.0)
    return torch.where(bad, argmax_one_hot, probs)


def _one_hot_argmax(
    logits: torch.Tensor,  # [n, vocab] float32
) -> torch.Tensor:  # [n, vocab] float32
    one_hot = torch.zeros_like(logits)
    one_hot.scatter_(1, logits.argmax(dim=-1, keepdim=True), 1.0)
    return one_hot


def _effective_top_k(
    top_k: torch.Tensor,  # [n] int64
    vocab: int,
) -> torch.Tensor:  # [n] int64 in [1, vocab]
    return torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)


def _apply_top_k_only(
    scaled: torch.Tensor,  # [n, vocab] float32
    sampling: SamplingTensors,
) -> torch.Tensor:  # [n, vocab] float32, dropped logits are -inf
    # topk of the largest k asked for is cheaper than a full sort of the vocabulary.
    vocab = scaled.shape[-1]
    k_max = min(sampling.max_top_k, vocab)
    top_values = scaled.topk(k_max, dim=-1).values  # [n, k_max] descending
    k = _effective_top_k(sampling.top_k, vocab)
    kth = top_values.gather(1, (k.clamp(max=k_max) - 1).unsqueeze(1))  # [n, 1]
    # Rows with top-k off (k == vocab) may exceed k_max: keep everything there.
    kth = torch.where((k > k_max).unsqueeze(1), -torch.inf, kth)
    return scaled.masked_fill(scaled < kth, -torch.inf)


def _apply_top_k_top_p_sorted(
    scaled: torch.Tensor,  # [n, vocab] float32
    sampling: SamplingTensors,
) -> torch.Tensor:  # [n, vocab] float32, dropped logits are -inf
    vocab = scaled.shape[-1]
    sorted_logits, order = scaled.sort(dim=-1)  # ascending
    if sampling.any_top_k:
        k = _effective_top_k(sampling.top_k, vocab)
        kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [n, 1]
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, -torch.inf)
    # Mass at or below each token in ascending order; a token can go when the
    # strictly more likely tokens already hold at least top_p of the mass.
    cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop = cumulative <= (1.0 - sampling.top_p).unsqueeze(1)
    drop[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(drop, -torch.inf)
    return torch.empty_like(scaled).scatter_(1, order, sorted_logits)


def _apply_min_p(
    probs: torch.Tensor,  # [n, vocab] float32
    min_p: torch.Tensor,  # [n] float32
) -> torch.Tensor:  # [n, vocab] float32, renormalised
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    kept = probs.masked_fill(probs < threshold, 0.0)
    return kept / kept.sum(dim=-1, keepdim=True)


def resolve_seed(seed: int | None) -> int:
    """``seed`` itself, or a fresh random one to report back when it is None."""
    return secrets.randbits(63) if seed is None else seed


def make_generator(seed: int) -> torch.Generator:
    """A per-request CPU generator.

    Draws happen on the CPU (a few numbers per request per step) and are then
    moved to the device, so a seed gives the same draws on every device.
    """
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    return generator
