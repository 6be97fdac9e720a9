"""The target layers a trained drafter reads its features from."""

from __future__ import annotations

from collections.abc import Sequence


def layers_out_of_range(name: str, layers: Sequence[int], num_target_layers: int) -> list[int]:
    """The entries of ``layers`` (the config field ``name``) that are no layer
    of a ``num_target_layers``-layer target; raises if it names none."""
    if not layers:
        raise ValueError(f"{name} must name at least one target layer")
    return [i for i in layers if not 0 <= i < num_target_layers]
