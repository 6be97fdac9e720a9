"""Read checkpoint tensors, or only a rank's slice of them, from safetensors.

Each rank asks for exactly the rows or columns it owns, so a shard never
materialises the full model. Only safetensors are read: pickled weights are
never loaded. Block-scaled FP8 weights are dequantized as they are read
(see :mod:`specray.actors.parallel.fp8`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from specray.actors.parallel import fp8
from specray.actors.parallel.span import Span


class MissingWeightError(KeyError):
    """A tensor the model needs is not in the checkpoint."""


class WeightSource:
    """All tensors of a checkpoint directory, read lazily and by slice.

    ``aliases`` are ``(prefix, alternative)`` pairs: a name starting with
    ``prefix`` that the checkpoint lacks is looked up with ``alternative``
    in its place (checkpoints of one architecture name top-level tensors
    differently).
    """

    def __init__(self, model_dir: str | Path, aliases: Sequence[tuple[str, str]] = ()) -> None:
        model_dir = Path(model_dir)
        self._aliases = tuple(aliases)
        self._fp8_block = _fp8_block(model_dir)
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
        return self._resolve(name) in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def shape(self, name: str) -> list[int]:
        name = self._resolve(name)
        return list(self._handle(name).get_slice(name).get_shape())

    def read(self, name: str, span: Span | None = None) -> torch.Tensor:
        """The tensor ``name``, or its ``span``; float32 where the checkpoint
        holds it as block-scaled FP8."""
        name = self._resolve(name)
        view = self._handle(name).get_slice(name)
        shape = view.get_shape()
        if view.get_dtype() == "F8_E4M3":
            return self._read_fp8(name, shape, span)
        if span is None:
            return self._handle(name).get_tensor(name)
        return view[span.index(len(shape))]

    def _read_fp8(self, name: str, shape: list[int], span: Span | None) -> torch.Tensor:
        scale_name = next((s for s in fp8.scale_names(name) if s in self._where), None)
        if len(shape) != 2 or scale_name is None:
            wanted = fp8.scale_names(name)
            raise MissingWeightError(f"FP8 tensor {name!r} has no block scale {wanted}")
        view = self._handle(name).get_slice(name)
        scale = self._handle(scale_name).get_tensor(scale_name)
        if span is None:
            return fp8.dequantize(view[:, :], scale, self._fp8_block)
        # Dequantize the whole blocks around the span, then cut.
        size, block = shape[span.dim], self._fp8_block[span.dim]
        first, last = span.blocks(block, size)
        window = Span(span.dim, first * block, min(last * block, size))
        scales = Span(span.dim, first, last)
        values = fp8.dequantize(view[window.index(2)], scale[scales.index(2)], self._fp8_block)
        return values.narrow(span.dim, span.start - window.start, span.stop(size) - span.start)

    def _resolve(self, name: str) -> str:
        if name in self._where:
            return name
        for prefix, alternative in self._aliases:
            if name.startswith(prefix):
                other = alternative + name[len(prefix) :]
                if other in self._where:
                    return other
        return name

    def _handle(self, name: str) -> Any:
        try:
            return self._where[name]
        except KeyError:
            raise MissingWeightError(f"checkpoint has no tensor {name!r}") from None


def _fp8_block(model_dir: Path) -> tuple[int, int]:
    config = model_dir / "config.json"
    if not config.exists():
        return fp8.DEFAULT_BLOCK
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    rows, cols = quant.get("weight_block_size") or fp8.DEFAULT_BLOCK
    return int(rows), int(cols)
