"""TP / EP / PP layouts of one model replica and what each puts on a GPU.

A replica is ``pp`` pipeline stages of ``width`` GPUs each. Within a stage:

- ``tp``: attention and experts tensor-parallel over the stage (each GPU
  holds a 1/width slice of every expert);
- ``tp-ep``: attention tensor-parallel, routed experts expert-parallel
  (each GPU holds routed_experts/width whole experts);
- ``dp-ep``: attention data-parallel (every GPU holds the stage's attention
  weights and the KV cache of its own requests only), experts expert-parallel;
- ``ep``: attention replicated (every GPU runs it for every request),
  routed experts expert-parallel, one all-reduce per MoE layer.

specray's target group runs ``tp`` (``tp: width``) and ``ep`` (``ep: width``)
stages without PP (:attr:`Layout.runnable`); the planner ranks the others
but picks only these.

MLA caches one latent per token and layer that every head reads, so under
attention TP each rank keeps the whole latent of every request: TP does not
divide the KV cache, data-parallel attention does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from specray.cluster.planning.hardware import GpuSpec
from specray.cluster.planning.model_specs import ModelSpec

Family = Literal["tp", "tp-ep", "dp-ep", "ep"]
FAMILIES: tuple[Family, ...] = ("tp", "tp-ep", "dp-ep", "ep")
DTYPE_BYTES = {"fp8": 1.0, "bf16": 2.0}


@dataclass(frozen=True)
class ClusterShape:
    """Nodes of equal GPU count."""

    nodes: int
    gpus_per_node: int

    def __post_init__(self) -> None:
        if self.nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {self.nodes}")
        if self.gpus_per_node < 1:
            raise ValueError(f"--gpus-per-node must be >= 1, got {self.gpus_per_node}")

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


@dataclass(frozen=True)
class Precision:
    """Bytes per weight, per cached KV value and per activation on the wire."""

    weights: str  # "fp8" | "bf16"
    kv: str
    activation_bytes: float = 2.0  # bf16 hidden states on the wire

    def __post_init__(self) -> None:
        for name in ("weights", "kv"):
            if getattr(self, name) not in DTYPE_BYTES:
                flag = "--dtype" if name == "weights" else "--kv-dtype"
                raise ValueError(
                    f"{flag} must be one of {sorted(DTYPE_BYTES)}, got {getattr(self, name)!r}"
                )

    @property
    def weight_bytes(self) -> float:
        return DTYPE_BYTES[self.weights]

    @property
    def kv_bytes(self) -> float:
        return DTYPE_BYTES[self.kv]


@dataclass(frozen=True)
class MemoryBudget:
    """What of a GPU's HBM the weights and KV cache may use."""

    utilization: float = 0.90  # share of HBM the server may use (vLLM's default)
    reserve_gb: float = 6.0  # per GPU: activations, CUDA graphs, NCCL buffers

    def __post_init__(self) -> None:
        if not 0 < self.utilization <= 1:
            raise ValueError(f"--memory-utilization must be in (0, 1], got {self.utilization}")
        if self.reserve_gb < 0:
            raise ValueError(f"--reserve-gb must be >= 0, got {self.reserve_gb}")

    def usable_bytes(self, gpu: GpuSpec) -> float:
        return gpu.memory_gb * 1e9 * self.utilization - self.reserve_gb * 1e9


@dataclass(frozen=True)
class Layout:
    """One replica's split: ``pp`` stages of ``width`` GPUs, in one family."""

    family: Family
    width: int  # GPUs per pipeline stage
    pp: int

    @property
    def gpus(self) -> int:
        return self.width * self.pp

    @property
    def attention_tp(self) -> int:
        return 1 if self.family in ("dp-ep", "ep") else self.width

    @property
    def runnable(self) -> bool:
        """Whether specray's target group runs it: one stage, ``tp`` or ``ep``."""
        return self.pp == 1 and self.family in ("tp", "ep")

    @property
    def serve_tp(self) -> int:
        """``tp:`` of the serve config (ranks per expert-parallel row)."""
        return self.width if self.family == "tp" else 1

    @property
    def serve_ep(self) -> int:
        """``ep:`` of the serve config (rows the routed experts split over)."""
        return 1 if self.family == "tp" else self.width

    @property
    def ep(self) -> int:
        return 1 if self.family == "tp" else self.width

    @property
    def label(self) -> str:
        stage = {
            "tp": f"TP{self.width}",
            "tp-ep": f"TP{self.width}+EP{self.width}",
            "dp-ep": f"DP{self.width}-attn+EP{self.width}",
            "ep": f"EP{self.width}",
        }[self.family]
        return stage if self.pp == 1 else f"{stage} x PP{self.pp}"

    def stage_layers(self, model: ModelSpec) -> int:
        """Layers of the fullest stage."""
        return math.ceil(model.num_layers / self.pp)

    def spans_nodes(self, shape: ClusterShape) -> bool:
        """Whether one stage's collectives cross nodes."""
        return self.width > shape.gpus_per_node

    def cross_node_hops(self, shape: ClusterShape) -> int:
        """Stage boundaries that cross a node (stages packed in rank order)."""
        if self.pp == 1:
            return 0
        if self.width >= shape.gpus_per_node:
            return self.pp - 1
        return math.ceil(self.gpus / shape.gpus_per_node) - 1


def candidate_layouts(model: ModelSpec, shape: ClusterShape) -> list[Layout]:
    """Every layout whose shards divide the model evenly and whose replicas tile the nodes."""
    gpn = shape.gpus_per_node
    widths = [d for d in range(1, gpn + 1) if gpn % d == 0]
    widths += [gpn * m for m in range(2, shape.nodes + 1) if shape.nodes % m == 0]
    layouts: list[Layout] = []
    for width in widths:
        for pp in range(1, min(shape.gpus // width, model.num_layers) + 1):
            gpus = width * pp
            if gpus % gpn and gpn % gpus:
                continue  # replicas would straddle nodes unevenly
            for family in FAMILIES:
                if family != "tp" and width == 1:
                    continue
                if family in ("tp", "tp-ep") and model.num_heads % width:
                    continue
                if family != "tp" and model.routed_experts % width:
                    continue
                layouts.append(Layout(family, width, pp))
    return layouts


@dataclass(frozen=True)
class Memory:
    """What one layout puts on its fullest GPU, and the KV room left."""

    weight_bytes_per_gpu: float
    usable_bytes_per_gpu: float
    kv_bytes_per_token_per_gpu: float  # one token of one request, this GPU's layers
    kv_tokens_per_gpu: int
    kv_tokens_per_replica: int
    max_request_context: int  # one request's longest context: one GPU's room, at most max_context
    full_context_requests: int  # requests of max_context the replica holds at once

    @property
    def fits(self) -> bool:
        return self.weight_bytes_per_gpu <= self.usable_bytes_per_gpu

    @property
    def free_bytes_per_gpu(self) -> float:
        return max(0.0, self.usable_bytes_per_gpu - self.weight_bytes_per_gpu)


def layout_memory(
    layout: Layout,
    model: ModelSpec,
    gpu: GpuSpec,
    precision: Precision,
    budget: MemoryBudget,
    requests: int = 0,
) -> Memory:
    """Weights and KV room on the fullest GPU (embeddings counted with the
    layers), after ``requests``' fixed cache (V4's windows) per replica."""
    share = layout.stage_layers(model) / model.num_layers
    params = share * (
        model.attention_params / layout.attention_tp
        + model.other_dense_params / layout.width
        + model.routed_params / layout.width
    )
    weights = params * precision.weight_bytes
    usable = budget.usable_bytes(gpu)
    per_token = model.kv_bytes_per_token_layer(precision.kv_bytes) * layout.stage_layers(model)
    holders = layout.width if layout.family == "dp-ep" else 1  # GPUs with distinct requests
    fixed = math.ceil(requests / holders) * model.request_cache_bytes(precision.kv_bytes) * share
    tokens = int(max(0.0, usable - weights - fixed) // per_token)
    return Memory(
        weight_bytes_per_gpu=weights,
        usable_bytes_per_gpu=usable,
        kv_bytes_per_token_per_gpu=per_token,
        kv_tokens_per_gpu=tokens,
        kv_tokens_per_replica=tokens * holders,
        max_request_context=min(tokens, model.max_context),
        full_context_requests=holders * (tokens // model.max_context),
    )
