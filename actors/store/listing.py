"""What the store can fetch, and what it already holds."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from specray.actors.store.layout import DEFAULT_DTYPE, StoreLayout
from specray.actors.store.manifest import read_manifest
from specray.actors.store.registry import REGISTRY


@dataclass(frozen=True)
class ModelStatus:
    name: str
    dtype: str
    source_bytes: int  # the GGUF checkpoint
    cached: bool
    path: Path  # where it is, or where fetching would put it
    disk_bytes: int  # of the cached directory; 0 when not cached
    registered: bool  # False for a local GGUF imported by sha256


def _disk_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


def list_models(home: Path | None = None) -> list[ModelStatus]:
    """Every cached model directory, plus every registered model not yet cached (in float32)."""
    layout = StoreLayout.at(home)
    rows: dict[tuple[str, str], ModelStatus] = {}
    if layout.models_dir.is_dir():
        for directory in sorted(layout.models_dir.iterdir()):
            manifest = read_manifest(directory)
            if manifest is None:
                continue
            spec = REGISTRY.get(manifest.name)
            if spec is not None and manifest.source_sha256 != spec.sha256:
                continue  # an older pin: fetching rebuilds it
            rows[(manifest.name, manifest.dtype)] = ModelStatus(
                name=manifest.name,
                dtype=manifest.dtype,
                source_bytes=manifest.source_size,
                cached=True,
                path=directory,
                disk_bytes=_disk_bytes(directory),
                registered=spec is not None,
            )
    for spec in REGISTRY.values():
        if not any(name == spec.name for name, _ in rows):
            rows[(spec.name, DEFAULT_DTYPE)] = ModelStatus(
                name=spec.name,
                dtype=DEFAULT_DTYPE,
                source_bytes=spec.size,
                cached=False,
                path=layout.model_dir(spec.name, DEFAULT_DTYPE),
                disk_bytes=0,
                registered=True,
            )
    return [rows[key] for key in sorted(rows)]
