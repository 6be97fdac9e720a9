"""Build a model directory in a temp folder, then move it into the cache in one rename.

A crash or error at any point leaves either the previous state or the finished
directory, never a half-written one; the temp folder is removed on the way out.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from specray.actors.store.errors import StoreError
from specray.actors.store.layout import StoreLayout
from specray.actors.store.lock import file_lock
from specray.actors.store.manifest import Manifest, read_manifest

# (work dir for scratch files, staging dir that becomes the model dir) -> its manifest
Builder = Callable[[Path, Path], Manifest]


def complete_dir(target: Path, source_sha256: str, dtype: str) -> Path | None:
    """``target`` if it is a finished build of that source in that dtype."""
    manifest = read_manifest(target)
    if manifest is None or manifest.source_sha256 != source_sha256 or manifest.dtype != dtype:
        return None
    return target


def install(
    layout: StoreLayout,
    target: Path,
    source_sha256: str,
    dtype: str,
    build: Builder,
    progress: bool = True,
) -> Path:
    """Return ``target``, building it with ``build`` unless a complete copy is already there."""
    if complete_dir(target, source_sha256, dtype) is not None:
        return target
    note = f"waiting for another process that is building {target.name} ..." if progress else None
    with file_lock(layout.locks_dir / f"{target.name}.lock", waiting_note=note):
        # Whoever held the lock before us may have just finished it.
        if complete_dir(target, source_sha256, dtype) is not None:
            return target
        prefix = f"{target.name}@"
        _remove_leftovers(layout, target, prefix)
        work = _make_work_dir(layout, prefix)
        try:
            staging = work / "model"
            staging.mkdir()
            build(work, staging).write(staging)
            _finalise_files(staging)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging, target)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _remove_if_empty(layout.tmp_dir)
    return target


def _remove_leftovers(layout: StoreLayout, target: Path, prefix: str) -> None:
    """Drop what a killed build of this target left behind; the lock says nobody owns it."""
    if layout.tmp_dir.is_dir():
        for stale in layout.tmp_dir.iterdir():
            if stale.name.startswith(prefix):
                shutil.rmtree(stale, ignore_errors=True)
    if target.exists():  # incomplete, or built from another source: rebuild it
        shutil.rmtree(target)


def _make_work_dir(layout: StoreLayout, prefix: str) -> Path:
    # Another process may remove the empty tmp/ between our mkdir and mkdtemp: retry.
    for _ in range(3):
        layout.tmp_dir.mkdir(parents=True, exist_ok=True)
        try:
            return Path(tempfile.mkdtemp(prefix=prefix, dir=layout.tmp_dir))
        except FileNotFoundError:
            continue
    raise StoreError(f"could not create a temp directory under {layout.tmp_dir}")


def _finalise_files(directory: Path) -> None:
    """Make every file world-readable (the cache may be shared; some writers use 0600) and
    flush it, so the rename never publishes files that a power cut could leave empty."""
    for path in directory.rglob("*"):
        if path.is_file():
            path.chmod(0o644)
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _remove_if_empty(directory: Path) -> None:
    # Not empty (another build is running), or already gone: both fine.
    with contextlib.suppress(OSError):
        directory.rmdir()
