"""Decode step time of one replica: HBM reads plus collectives, no overlap.

Decode is memory-bound, so a step costs the bytes its busiest GPU reads
over the HBM bandwidth (weights of the experts the batch touches, plus the
KV cache its requests attend to), plus the collectives between GPUs at
nccl-tests' busbw. Compute and overlap are ignored: that makes these
estimates lower bounds on the step (the bandwidth alone allows no less),
comparable between layouts. A step here is one trip through every pipeline
stage: PP adds hops and divides memory; its gain is that pp micro-batches
are in flight at once (the planner passes one micro-batch as ``batch``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from specray.cluster.planning.hardware import GpuSpec
from specray.cluster.planning.layouts import ClusterShape, Layout, Precision
from specray.cluster.planning.model_specs import ModelSpec


@dataclass(frozen=True)
class StepTime:
    """Seconds of one decode (or verify) step and what they are made of."""

    weight_bytes_read: float  # per GPU, over all stages
    kv_bytes_read: float  # per GPU, over all stages
    hbm_s: float
    comm_s: float
    collectives: int  # all-reduces, all-to-alls and hops per step

    @property
    def total_s(self) -> float:
        return self.hbm_s + self.comm_s


def experts_touched(model: ModelSpec, tokens: int) -> float:
    """Expected distinct routed experts per MoE layer for ``tokens`` tokens,
    with routing uniform and independent across tokens."""
    share = model.experts_per_token / model.routed_experts
    return model.routed_experts * (1.0 - (1.0 - share) ** tokens)


def step_time(
    layout: Layout,
    model: ModelSpec,
    gpu: GpuSpec,
    shape: ClusterShape,
    precision: Precision,
    batch: int,
    context: int,
    tokens_per_request: int = 1,
    hbm_efficiency: float = 0.8,
) -> StepTime:
    """One step of ``batch`` requests, each attending to ``context`` cached
    tokens and adding ``tokens_per_request`` (γ + 1 when verifying drafts)."""
    tokens = batch * tokens_per_request
    routed_read = model.moe_layers * experts_touched(model, tokens) * model.expert_params
    weights = (
        model.attention_params / layout.attention_tp
        + model.other_dense_params / layout.width
        + routed_read / layout.width  # experts spread evenly over the stage
    ) * precision.weight_bytes
    # The γ + 1 queries of a request read its cache once, as one query does.
    requests_per_gpu = math.ceil(batch / layout.width) if layout.family == "dp-ep" else batch
    kv = requests_per_gpu * context * model.kv_bytes_per_token(precision.kv_bytes)
    hbm_s = (weights + kv) / (gpu.hbm_tbps * 1e12 * hbm_efficiency)

    link = gpu.inter if layout.spans_nodes(shape) else gpu.intra
    hidden = tokens * model.hidden_size * precision.activation_bytes
    dispatch = hidden * model.experts_per_token / layout.width  # per rank, each way
    all_reduces = {
        "tp": 2 * model.num_layers,  # after attention and after the FFN
        "tp-ep": model.num_layers + model.first_dense_layers,  # attention, dense FFNs
        "dp-ep": model.first_dense_layers,
        "ep": model.num_layers,  # every token on every rank: the combine is an all-reduce
    }[layout.family]
    all_to_alls = 0 if layout.family in ("tp", "ep") else 2 * model.moe_layers  # each way
    comm = all_reduces * link.all_reduce_s(layout.width, hidden)
    comm += all_to_alls * link.all_to_all_s(layout.width, dispatch)
    hops = layout.pp - 1
    cross = layout.cross_node_hops(shape)
    comm += cross * gpu.inter.send_s(hidden) + (hops - cross) * gpu.intra.send_s(hidden)
    collectives = (all_reduces + all_to_alls if layout.width > 1 else 0) + hops
    return StepTime(weights, kv, hbm_s, comm, collectives)
