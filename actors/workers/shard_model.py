"""What every rank of a target replica loads (a value the cluster layer
builds and each shard receives whole)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ShardModel:
    """What every rank of a target replica loads: the model, how its weights
    are held, and the caches it serves from."""

    model_dir: str
    dtype: str = "float32"
    weights: str = "dense"  # or "gguf": the model dir's GGUF blocks, low-bit kernels
    num_slots: int = 8
    max_len: int = 2048
    prefix_tokens: int = 0  # the prefix cache, in positions (0: none)
