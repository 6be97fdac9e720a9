"""Turn what a user typed (a registered name, a directory, a .gguf file) into a model directory."""

from __future__ import annotations

from pathlib import Path

from specray.actors.store.errors import (
    NotCachedError,
    StoreError,
    UnknownModelError,
    UnsafeWeightsError,
)
from specray.actors.store.fetch import cached_path, fetch_spec
from specray.actors.store.layout import DEFAULT_DTYPE
from specray.actors.store.local_gguf import import_gguf
from specray.actors.store.registry import REGISTRY

PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"})


def resolve_model(
    name_or_path: str | Path,
    home: Path | None = None,
    fetch_missing: bool = True,
    dtype: str = DEFAULT_DTYPE,
    progress: bool = True,
) -> Path:
    """A directory holding ``config.json``, safetensors weights and (usually) a tokenizer.

    - a registered name: its cached directory, fetched first if missing and allowed;
    - a ``.gguf`` file: converted once into the cache, keyed by its sha256;
    - a Hugging Face directory with safetensors: that directory, unchanged.
    ``dtype`` applies to what the store converts; a local directory keeps its own.
    """
    if isinstance(name_or_path, str) and name_or_path in REGISTRY:
        spec = REGISTRY[name_or_path]
        cached = cached_path(spec, home, dtype)
        if cached is not None:
            return cached
        if not fetch_missing:
            raise NotCachedError(
                f"model {spec.name!r} ({dtype}) is not cached; "
                f"run `specray models fetch {spec.name} --dtype {dtype}` first"
            )
        return fetch_spec(spec, home=home, dtype=dtype, progress=progress)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return import_gguf(path, home=home, dtype=dtype, progress=progress)
    if path.is_dir():
        return check_hf_dir(path)
    if path.exists():
        raise StoreError(f"{path} is neither a model directory nor a .gguf file")
    known = ", ".join(sorted(REGISTRY))
    raise UnknownModelError(
        f"{str(name_or_path)!r} is not a registered model ({known}) nor an existing path"
    )


def check_hf_dir(directory: Path) -> Path:
    """``directory`` (absolute) if it is a Hugging Face checkpoint with safetensors weights."""
    directory = directory.absolute()
    if any(directory.glob("*.safetensors")) and (directory / "config.json").is_file():
        return directory
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeWeightsError(
            f"{directory} holds only pickle weights ({', '.join(pickles)}); specray loads "
            "weights only from safetensors or GGUF, never pickle (unpickling runs arbitrary "
            "code). Convert them to safetensors first."
        )
    ggufs = sorted(p.name for p in directory.glob("*.gguf"))
    if ggufs:
        raise StoreError(f"{directory} holds GGUF files ({', '.join(ggufs)}); pass the file path")
    if not (directory / "config.json").is_file():
        raise StoreError(f"{directory} has no config.json: not a Hugging Face model directory")
    raise StoreError(f"{directory} has no *.safetensors weights")
