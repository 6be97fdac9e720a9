"""The head's reduced vocabulary: the tokens the target actually writes.

A 150k-row LM head would cost the head more than its decoder layer; the
target's answers use a small part of that vocabulary (EAGLE-3 drafts from
32k of Llama 3's 128k). Tokens outside it are never drafted, which costs
acceptance only where the target writes them.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch


def token_counts(sequences: Iterable[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """``[vocab_size]`` int64: how often each token occurs in ``sequences``."""
    counts = torch.zeros(vocab_size, dtype=torch.int64)
    for tokens in sequences:
        counts += torch.bincount(tokens.to(torch.int64), minlength=vocab_size)
    return counts


def choose_draft_vocab(counts: torch.Tensor, size: int, always: Sequence[int] = ()) -> torch.Tensor:
    """The ``size`` most frequent tokens (ties to the lower id), ``always``
    included, sorted by id. Fewer if fewer tokens ever occur."""
    if size < 1:
        raise ValueError(f"draft vocabulary size must be >= 1, got {size}")
    vocab_size = counts.shape[0]
    bad = [t for t in always if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"token ids {bad} outside the vocabulary of {vocab_size}")
    keep = set(int(t) for t in always)
    # Stable sort on -count keeps ids ascending within a tie.
    order = torch.sort(-counts, stable=True).indices.tolist()
    seen = [t for t in order if counts[t] > 0 and t not in keep]
    chosen = sorted(keep | set(seen[: max(0, size - len(keep))]))
    return torch.tensor(chosen, dtype=torch.int64)


def coverage(counts: torch.Tensor, draft_vocab: torch.Tensor) -> float:
    """Share of token occurrences that the draft vocabulary can propose."""
    total = int(counts.sum())
    return float(counts[draft_vocab].sum()) / total if total else 1.0
