"""Import a GGUF file from local disk into the cache, keyed by its sha256 (the
file itself is kept beside the converted weights)."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

from specray.actors.store.assemble import sha256_file
from specray.actors.store.convert import convert_gguf, converter_versions
from specray.actors.store.install import install
from specray.actors.store.layout import DEFAULT_DTYPE, StoreLayout, check_dtype
from specray.actors.store.manifest import Manifest


def gguf_key(sha256: str) -> str:
    """The cache name of a local GGUF: its content, not its path, identifies it."""
    return f"gguf-{sha256[:16]}"


def link_or_copy(source: Path, target: Path) -> None:
    """A hard link where the filesystem allows one (no second copy), else a copy."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copyfile(source, target)


def import_gguf(
    gguf_path: Path, home: Path | None = None, dtype: str = DEFAULT_DTYPE, progress: bool = True
) -> Path:
    """The cached safetensors directory converted from ``gguf_path``."""
    gguf_path = gguf_path.expanduser().absolute()
    layout = StoreLayout.at(home)
    sha256 = sha256_file(gguf_path)
    key = gguf_key(sha256)
    target = layout.model_dir(key, check_dtype(dtype))

    def build(work: Path, staging: Path) -> Manifest:
        convert_gguf(gguf_path, staging, dtype, progress)
        link_or_copy(gguf_path, staging / gguf_path.name)
        return Manifest(
            name=key,
            dtype=dtype,
            source_sha256=sha256,
            source_size=gguf_path.stat().st_size,
            gguf_filename=gguf_path.name,
            packages=(),
            licence="unknown (imported from a local file)",
            origin=str(gguf_path),
            versions=converter_versions(),
            created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    return install(layout, target, sha256, dtype, build, progress)
