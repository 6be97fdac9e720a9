"""The model directory a target loads for a weight format.

Dense weights come from the store's safetensors copy in the model dtype.
GGUF weights need the GGUF file itself: the store keeps it beside the copy
it converted (in whichever dtype), so any cached directory holding it will
do, and only when none does is it fetched.
"""

from __future__ import annotations

from pathlib import Path

from specray.actors.store.fetch import cached_path
from specray.actors.store.gguf_file import fetch_gguf, gguf_in
from specray.actors.store.layout import DEFAULT_DTYPE, DTYPES
from specray.actors.store.registry import REGISTRY
from specray.actors.store.resolve import resolve_model


def kept_gguf(target: str | Path, home: Path | None = None) -> Path | None:
    """A GGUF file of ``target`` already on this machine, without fetching:
    the one kept beside a cached conversion, the file itself, or the one
    ``.gguf`` in a model directory."""
    if isinstance(target, str) and target in REGISTRY:
        for dtype in DTYPES:
            cached = cached_path(REGISTRY[target], home, dtype)
            kept = gguf_in(cached) if cached is not None else None
            if kept is not None:
                return kept
        return None
    path = Path(target).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def weights_dir(
    target: str | Path, weights: str, dtype: str = DEFAULT_DTYPE, home: Path | None = None
) -> Path:
    """The directory ``load_model(dir, dtype, weights=weights)`` reads.

    ``weights="gguf"``: for a registered model, a cached directory holding
    its GGUF (fetched beside the ``dtype`` copy when none does); a ``.gguf``
    path is imported with the file kept beside the conversion; a directory
    is used as it is. ``"dense"``: :func:`resolve_model` in ``dtype``.
    """
    if weights == "gguf":
        if isinstance(target, str) and target in REGISTRY:
            kept = kept_gguf(target, home)
            return (kept or fetch_gguf(target, home, dtype=dtype)).parent
        path = Path(target).expanduser()
        if path.is_dir():
            return path.absolute()
    return resolve_model(target, home=home, dtype=dtype)
