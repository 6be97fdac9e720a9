"""Training data of a draft head: the target's own generations, on disk.

One :class:`DraftSample` per generated answer. Row ``t`` holds the target's
hidden states (the head's layers, concatenated, bf16) at the position whose
output is ``tokens[t]``, and the target's top-k distribution there
(temperature 1), from which the TV loss is computed. Row 0 is the prompt's
last position, as when the head drafts: it never sees the prompt itself.

Shards are safetensors files of concatenated rows plus offsets; ``meta.json``
records what produced them, so a cache can be reused only when it matches.
A set made with more layers than a drafter reads serves it too: loading
picks the drafter's layers (so a head and a DSpark drafter can train on the
very same answers).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

META_NAME = "meta.json"


@dataclass
class DraftSample:
    """One generated answer with what the target saw along the way."""

    tokens: torch.Tensor  # [T] int64: tokens[t] is the target's output at row t
    hidden: torch.Tensor  # [T, layers * hidden] bfloat16
    top_ids: torch.Tensor  # [T, K] int64: the target's K most likely tokens, descending
    top_probs: torch.Tensor  # [T, K] float32: their probabilities (temperature 1)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class DraftDataWriter:
    """Appends samples to ``directory`` in shards of ``shard_rows`` rows."""

    def __init__(self, directory: Path, meta: dict[str, Any], shard_rows: int = 65536) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta)
        self.shard_rows = shard_rows
        self._buffer: list[DraftSample] = []
        self._buffered_rows = 0
        self._shards = 0
        self.num_samples = self.num_rows = 0

    def add(self, sample: DraftSample) -> None:
        self._buffer.append(sample)
        self.num_samples += 1
        self.num_rows += len(sample)
        self._buffered_rows += len(sample)
        if self._buffered_rows >= self.shard_rows:
            self._flush()

    def close(self) -> None:
        """Flush and write ``meta.json`` last: its presence marks a complete set."""
        self._flush()
        meta = {**self.meta, "samples": self.num_samples, "rows": self.num_rows}
        meta["shards"] = self._shards
        (self.directory / META_NAME).write_text(json.dumps(meta, indent=1) + "\n")

    def _flush(self) -> None:
        if not self._buffer:
            return
        lengths = torch.tensor([len(s) for s in self._buffer], dtype=torch.int64)
        tensors = {
            "lengths": lengths,
            "tokens": torch.cat([s.tokens for s in self._buffer]),
            "hidden": torch.cat([s.hidden for s in self._buffer]).to(torch.bfloat16),
            "top_ids": torch.cat([s.top_ids for s in self._buffer]).to(torch.int32),
            "top_probs": torch.cat([s.top_probs for s in self._buffer]).to(torch.float16),
        }
        save_file(tensors, str(self.directory / f"shard-{self._shards:05d}.safetensors"))
        self._shards += 1
        self._buffer, self._buffered_rows = [], 0


class DraftData:
    """Every sample of a data directory, in memory, in the order written;
    with ``layers``, only those target layers' hidden states, in that order."""

    def __init__(self, directory: Path, layers: Sequence[int] | None = None) -> None:
        self.directory = Path(directory)
        meta_path = self.directory / META_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: no complete draft data here")
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        parts = [load_file(str(p)) for p in sorted(self.directory.glob("shard-*.safetensors"))]
        if not parts:
            raise FileNotFoundError(f"{self.directory} holds no shards")
        self.lengths = torch.cat([p["lengths"] for p in parts])
        self.tokens = torch.cat([p["tokens"] for p in parts]).to(torch.int64)
        self.hidden = torch.cat([p["hidden"] for p in parts])
        if layers is not None:
            self.hidden = select_layers(self.hidden, stored_layers(self.meta), layers, meta_path)
        self.top_ids = torch.cat([p["top_ids"] for p in parts]).to(torch.int64)
        self.top_probs = torch.cat([p["top_probs"] for p in parts]).float()
        self.offsets = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths.cumsum(0)])

    def __len__(self) -> int:
        return int(self.lengths.shape[0])

    def __getitem__(self, index: int) -> DraftSample:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return DraftSample(
            self.tokens[start:end],
            self.hidden[start:end],
            self.top_ids[start:end],
            self.top_probs[start:end],
        )

    def __iter__(self) -> Iterator[DraftSample]:
        return (self[i] for i in range(len(self)))

    @staticmethod
    def is_complete(directory: Path, meta: dict[str, Any]) -> bool:
        """Whether ``directory`` holds a finished data set made with ``meta``."""
        path = Path(directory) / META_NAME
        if not path.is_file():
            return False
        stored = json.loads(path.read_text())
        meta = json.loads(json.dumps(meta))  # tuples read back as lists
        return all(stored.get(k) == v for k, v in meta.items())


def stored_layers(meta: dict[str, Any]) -> tuple[int, ...]:
    """The target layers whose hidden states a data set holds, in order."""
    layers = meta.get("generation", {}).get("hidden_layers")
    if layers is None:
        raise ValueError("the data's meta.json does not say which layers it holds")
    return tuple(int(i) for i in layers)


def select_layers(
    hidden: torch.Tensor,  # [T, len(stored) * hidden]
    stored: Sequence[int],
    wanted: Sequence[int],
    source: Path,
) -> torch.Tensor:  # [T, len(wanted) * hidden]
    """The columns of ``wanted`` layers, in ``wanted`` order (a copy, so the
    full set can be freed)."""
    if list(wanted) == list(stored):
        return hidden
    missing = [i for i in wanted if i not in stored]
    if missing:
        raise ValueError(
            f"{source}: the data holds hidden states of layers {list(stored)}, "
            f"not of {missing}; make data with --layers including them"
        )
    width = hidden.shape[1] // len(stored)
    columns = [hidden[:, stored.index(i) * width : (stored.index(i) + 1) * width] for i in wanted]
    return torch.cat(columns, dim=1)
