"""Suffix Decoding: training-free drafts from suffix trees over the request and
over recent outputs (see :mod:`.drafter`)."""

from specray.actors.drafting.suffix.cache import SuffixCache
from specray.actors.drafting.suffix.drafter import SuffixConfig, SuffixDrafter
from specray.actors.drafting.suffix.speculate import SpeculationParams, SuffixDraft, speculate
from specray.actors.drafting.suffix.tree import SuffixTree

__all__ = [
    "SpeculationParams",
    "SuffixCache",
    "SuffixConfig",
    "SuffixDraft",
    "SuffixDrafter",
    "SuffixTree",
    "speculate",
]
