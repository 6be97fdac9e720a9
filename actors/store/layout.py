"""Where the store keeps things under its home directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from specray.actors.store.errors import StoreError

DTYPES = ("float32", "bfloat16")
DEFAULT_DTYPE = "float32"


def default_home() -> Path:
    """``$SPECRAY_HOME``, else ``~/.cache/specray``."""
    env = os.environ.get("SPECRAY_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specray"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise StoreError(f"unsupported dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return dtype


@dataclass(frozen=True)
class StoreLayout:
    """Paths under one store home.

    Temp work happens under ``tmp/`` on the same filesystem as ``models/``, so a
    finished directory moves into place with one atomic rename.
    """

    home: Path

    @classmethod
    def at(cls, home: Path | None) -> StoreLayout:
        return cls((home if home is not None else default_home()).expanduser().absolute())

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def tmp_dir(self) -> Path:
        return self.home / "tmp"

    @property
    def locks_dir(self) -> Path:
        return self.home / "locks"

    def model_dir(self, key: str, dtype: str) -> Path:
        """float32 lives at ``models/<key>``; other dtypes beside it, so both can coexist."""
        check_dtype(dtype)
        suffix = "" if dtype == DEFAULT_DTYPE else f"--{dtype}"
        return self.models_dir / f"{key}{suffix}"
