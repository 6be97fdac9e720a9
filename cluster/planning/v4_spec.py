"""DeepSeek-V4 as the planner sees it, read from a ``config.json``.

Parameters are counted, not assumed: transformers' ``DeepseekV4ForCausalLM``
is built on the meta device (no memory, no weights) and its parameters are
summed by role: routed experts (``mlp.experts``), attention (``self_attn``,
with its compressors and indexer), and everything else (shared experts,
hyper-connections, embeddings, head, norms).

The cache is V4's own design, not MLA's. Every layer keeps its last
``sliding_window`` keys (one shared KV head of ``head_dim``); a compressed
layer adds one entry of ``head_dim`` per ``rate`` tokens, and a CSA layer's
indexer one key of ``index_head_dim`` per CSA ``rate`` tokens. Each
compressor also keeps the rows of the windows it has not closed yet: at most
``2·rate`` rows of ``2·width`` values (scores and values; CSA rows are two
halves of ``head_dim``). So a request's cache is a constant (windows and
rows) plus a per-token part that grows with its context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CSA = "compressed_sparse_attention"
HCA = "heavily_compressed_attention"


@dataclass(frozen=True)
class V4Cache:
    """Cached values (not bytes) of one request, from a V4 config."""

    per_token: float  # per context token, summed over layers: compressed entries + indexer keys
    per_request: float  # whatever the context: sliding windows + unclosed compressor rows
    csa_layers: int
    hca_layers: int
    sliding_layers: int

    @classmethod
    def from_config(cls, config: Any) -> V4Cache:
        head, index_head = config.head_dim, config.index_head_dim
        window = config.sliding_window
        per_token = per_request = 0.0
        counts = {CSA: 0, HCA: 0}
        for kind in config.layer_types:
            per_request += window * head
            if kind not in counts:
                continue
            counts[kind] += 1
            rate = config.compress_rates[kind]
            per_token += head / rate
            width = 2 * head if kind == CSA else head
            per_request += 2 * rate * 2 * width
            if kind == CSA:
                per_token += index_head / rate
                per_request += 2 * rate * 2 * index_head
        sliding = len(config.layer_types) - counts[CSA] - counts[HCA]
        return cls(per_token, per_request, counts[CSA], counts[HCA], sliding)


@dataclass(frozen=True)
class V4Counts:
    """Parameters of a V4 checkpoint by role (main model; the MTP block apart)."""

    total: float
    routed: float  # every layer's routed experts
    attention: float  # every layer's attention, compressors and indexer
    expert: float  # one routed expert of one layer


def count_parameters(config: Any) -> V4Counts:
    """Sum the parameters of ``config``'s model, built on the meta device."""
    import torch
    from transformers import DeepseekV4ForCausalLM

    with torch.device("meta"):
        model = DeepseekV4ForCausalLM(config)
    total = routed = attention = 0.0
    for name, parameter in model.named_parameters():
        total += parameter.numel()
        if ".mlp.experts." in name:
            routed += parameter.numel()
        elif ".self_attn." in name:
            attention += parameter.numel()
    layers = len(config.mlp_layer_types)
    return V4Counts(total, routed, attention, routed / (layers * config.n_routed_experts))


def load_v4_config(path: str | Path) -> Any:
    """A ``DeepseekV4Config`` from a ``config.json`` (or its directory)."""
    from transformers import DeepseekV4Config

    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    data: dict[str, Any] = json.loads(path.read_text())
    if data.get("model_type") != "deepseek_v4":
        raise ValueError(f"{path}: model_type {data.get('model_type')!r}, not 'deepseek_v4'")
    return DeepseekV4Config(**data)
