"""What the trained drafters' configs share: the file each is saved in, and
the check that a drafter fits the target it is paired with."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "config.json"


@dataclass(frozen=True)
class SizeCheck:
    """One size a drafter was trained for, beside the target's."""

    name: str
    drafter: int
    target: int


def config_path(directory: str | Path, kind: str) -> Path:
    """The config file in ``directory``; ``kind`` names the checkpoint a
    directory without one is not."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a {kind} directory")
    return path


def check_fits_target(drafter: str, sizes: Iterable[SizeCheck]) -> None:
    """Raise ValueError naming every size in which ``drafter`` and the target differ."""
    mismatches = [
        f"{size.name} {size.drafter} != target's {size.target}"
        for size in sizes
        if size.drafter != size.target
    ]
    if mismatches:
        raise ValueError(f"{drafter} does not fit this target: {'; '.join(mismatches)}")
