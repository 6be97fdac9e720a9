"""``specray.json``: what a cached model directory was built from."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

MANIFEST_NAME = "specray.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Manifest:
    name: str
    dtype: str
    source_sha256: str  # of the assembled GGUF file
    source_size: int
    gguf_filename: str
    packages: tuple[str, ...]  # pinned requirements it came from; empty for a local file
    licence: str
    origin: str = "pypi"  # "pypi", or the path of the local .gguf file it was imported from
    versions: dict[str, str] = field(default_factory=dict)  # converter library versions
    created_utc: str = ""
    format_version: int = FORMAT_VERSION

    def write(self, directory: Path) -> None:
        payload = asdict(self)
        payload["packages"] = list(self.packages)
        (directory / MANIFEST_NAME).write_text(json.dumps(payload, indent=2) + "\n")


def read_manifest(directory: Path) -> Manifest | None:
    """The manifest of a complete model directory, or None if it is missing or unreadable."""
    try:
        payload: dict[str, Any] = json.loads((directory / MANIFEST_NAME).read_text())
        if payload.get("format_version") != FORMAT_VERSION:
            return None
        payload["packages"] = tuple(payload["packages"])
        manifest = Manifest(**payload)
    except (OSError, ValueError, TypeError, KeyError):
        return None
    if not (directory / "config.json").is_file() or not any(directory.glob("*.safetensors")):
        return None
    return manifest
