"""GPU and interconnect figures: datasheet numbers and labelled assumptions.

Memory and HBM bandwidth are the vendors' datasheet figures (1 GB = 1e9
bytes). Link figures are what nccl-tests' ``all_reduce_perf`` would report
(busbw at large sizes, time at small sizes) and are assumptions: replace
them with a measured ``specray cluster check --json`` (``--from-check``) or
``--busbw-gbps`` / ``--latency-us``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from specray.cluster.preflight.nccl_tests import bus_factor


@dataclass(frozen=True)
class Link:
    """A collective's cost: fixed latency plus bytes over nccl-tests' busbw."""

    busbw_gbps: float
    latency_us: float

    def __post_init__(self) -> None:
        if self.busbw_gbps <= 0 or self.latency_us < 0:
            raise ValueError(f"a link needs busbw > 0 and latency >= 0, got {self}")

    def all_reduce_s(self, ranks: int, size_bytes: float) -> float:
        """nccl-tests: busbw = algbw × 2(n−1)/n, so time = size × 2(n−1)/n / busbw."""
        if ranks <= 1:
            return 0.0
        return self.latency_us * 1e-6 + size_bytes * bus_factor(ranks) / (self.busbw_gbps * 1e9)

    def all_to_all_s(self, ranks: int, size_bytes: float) -> float:
        """nccl-tests' alltoall: busbw = algbw × (n−1)/n; ``size_bytes`` per rank."""
        if ranks <= 1:
            return 0.0
        moved = size_bytes * (ranks - 1) / ranks
        return self.latency_us * 1e-6 + moved / (self.busbw_gbps * 1e9)

    def send_s(self, size_bytes: float) -> float:
        """One point-to-point hop (a pipeline stage boundary)."""
        return self.latency_us * 1e-6 + size_bytes / (self.busbw_gbps * 1e9)


@dataclass(frozen=True)
class GpuSpec:
    """One GPU model and its links."""

    name: str
    memory_gb: float
    hbm_tbps: float
    intra: Link  # all-reduce among the GPUs of one node (NVLink / NVSwitch)
    inter: Link  # across nodes (InfiniBand / RoCE)
    note: str = ""

    def __post_init__(self) -> None:
        if self.memory_gb <= 0 or self.hbm_tbps <= 0:
            raise ValueError(f"GPU {self.name}: memory_gb and hbm_tbps must be > 0")


# Inter-node: one 400 Gb/s NIC per GPU (50 GB/s line rate), of which decode's
# small messages see little; 25-40 us for a small all-reduce over IB.
_IB_NDR = Link(busbw_gbps=40.0, latency_us=30.0)
GPUS: Mapping[str, GpuSpec] = {
    "h200": GpuSpec(
        "H200", 141.0, 4.8, Link(360.0, 10.0), _IB_NDR, "SXM, NVLink 4 (900 GB/s per GPU)"
    ),
    "h100": GpuSpec(
        "H100", 80.0, 3.35, Link(360.0, 10.0), _IB_NDR, "SXM, NVLink 4 (900 GB/s per GPU)"
    ),
    "b200": GpuSpec(
        "B200", 180.0, 8.0, Link(700.0, 8.0), _IB_NDR, "HGX B200, NVLink 5 (1.8 TB/s per GPU)"
    ),
    "a100": GpuSpec(
        "A100", 80.0, 2.039, Link(230.0, 12.0), Link(20.0, 30.0), "SXM 80 GB, NVLink 3, HDR IB"
    ),
}


def gpu_spec(name: str) -> GpuSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ValueError(f"--gpu must be one of {sorted(GPUS)}, got {name!r}") from None


def links_from_check(report: Mapping[str, Any], gpu: GpuSpec) -> GpuSpec:
    """``gpu`` with the links a ``specray cluster check --json`` measured.

    The slowest node's busbw and latency stand for every node (a layout runs
    at its slowest group's pace); the cross-node group's replace the
    inter-node link. A scope the report did not measure keeps its assumption.
    """
    found: dict[str, Link] = {}
    for scope, field in (("node", "intra"), ("cross-node", "inter")):
        measured = [
            g for g in report.get("groups", []) if g.get("scope") == scope and g.get("rows")
        ]
        if measured:
            found[field] = Link(
                busbw_gbps=min(g["peak_busbw_gbps"] for g in measured),
                latency_us=max(g["small_latency_us"] for g in measured),
            )
    return replace(gpu, intra=found.get("intra", gpu.intra), inter=found.get("inter", gpu.inter))
