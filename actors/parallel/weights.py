"""Read checkpoint tensors, or only a rank's slice of them, from safetensors.

Each rank asks for exactly the rows or columns it owns, so a shard never
materialises the full model. Only safetensors are read: pickled weights are
never loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open


class MissingWeightError(KeyError):
    """A tensor the model needs is not in the checkpoint."""


class WeightSource:
    """All tensors of a checkpoint directory, read lazily and by slice."""

    def __init__(self, model_dir: str | Path) -> None:
        model_dir = Path(model_dir)
        files = sorted(model_dir.glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(f"no *.safetensors files in {model_dir}")
        self._stack = ExitStack()
        self._where: dict[str, Any] = {}
        index = model_dir / "model.safetensors.index.json"
        wanted = None
        if index.exists():
            wanted = set(json.loads(index.read_text())["weight_map"].values())
        for path in files:
            if wanted is not None and path.name not in wanted:
                continue
            handle = self._stack.enter_context(safe_open(str(path), framework="pt"))
            for name in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                self._where[name] = handle

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> WeightSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def read(
        self,
        name: str,
        dim: int | None = None,
        start: int = 0,
        end: int | None = None,
    ) -> torch.Tensor:
        """The tensor ``name``, or its ``[start, end)`` slice along ``dim``."""
        handle = self._handle(name)
        if dim is None:
            return handle.get_tensor(name)
        view = handle.get_slice(name)
        index: list[slice] = [slice(None)] * len(view.get_shape())
        index[dim] = slice(start, end)
        return view[tuple(index)]

    def _handle(self, name: str) -> Any:
        try:
            return self._where[name]
        except KeyError:
            raise MissingWeightError(f"checkpoint has no tensor {name!r}") from None
