"""Check results, thresholds and the report: pure, no Ray."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from specray.cluster.preflight.nccl_tests import AllReduceRow, format_table

Scope = Literal["node", "cross-node"]
Method = Literal["nccl-tests", "torch-nccl", "torch-gloo"]


@dataclass(frozen=True)
class GroupResult:
    """One measured group: the GPUs (or CPU ranks) of a node, or one rank per node."""

    scope: Scope
    name: str  # e.g. "node 10.0.0.5 (3f2a9c1b)" or "cross-node (2 nodes)"
    node_ids: tuple[str, ...]
    method: Method | None  # None: skipped
    ranks: int
    rows: tuple[AllReduceRow, ...] = ()
    skipped: str | None = None  # why nothing was measured

    @property
    def peak_busbw_gbps(self) -> float:
        """busbw at the largest size, the figure links are judged by."""
        return self.rows[-1].busbw_gbps if self.rows else 0.0

    @property
    def small_latency_us(self) -> float:
        """Time of the smallest all-reduce: latency, not bandwidth."""
        return self.rows[0].time_us if self.rows else 0.0


@dataclass(frozen=True)
class Thresholds:
    """Limits a group must meet; ``None`` skips the check."""

    min_busbw_gbps: float | None = None  # node groups, busbw at the largest size
    min_cross_busbw_gbps: float | None = None  # the cross-node group
    max_latency_us: float | None = None  # every group, time at the smallest size

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and value <= 0:
                raise ValueError(f"--{name.replace('_', '-')} must be > 0, got {value}")


@dataclass(frozen=True)
class CheckReport:
    """The measured groups and every threshold they missed."""

    groups: tuple[GroupResult, ...]
    failures: tuple[str, ...] = field(default=())

    @property
    def ok(self) -> bool:
        return not self.failures


def evaluate(groups: Sequence[GroupResult], thresholds: Thresholds) -> CheckReport:
    """Every threshold a group misses, and every value nccl-tests found wrong, as a sentence."""
    failures: list[str] = []
    for group in groups:
        if not group.rows:
            continue
        for row in group.rows:
            if row.wrong:
                failures.append(
                    f"{group.name}: nccl-tests found {row.wrong} wrong values at "
                    f"{row.size_bytes} B (a broken GPU or link)"
                )
        limit, flag = (
            (thresholds.min_busbw_gbps, "--min-busbw-gbps")
            if group.scope == "node"
            else (thresholds.min_cross_busbw_gbps, "--min-cross-busbw-gbps")
        )
        largest = group.rows[-1]
        if limit is not None and largest.busbw_gbps < limit:
            failures.append(
                f"{group.name}: busbw {largest.busbw_gbps:.3f} GB/s at {largest.size_bytes} B "
                f"is below {flag} {limit:g}"
            )
        smallest = group.rows[0]
        if thresholds.max_latency_us is not None and smallest.time_us > thresholds.max_latency_us:
            failures.append(
                f"{group.name}: all-reduce of {smallest.size_bytes} B took "
                f"{smallest.time_us:.1f} us, above --max-latency-us {thresholds.max_latency_us:g}"
            )
    return CheckReport(tuple(groups), tuple(failures))


def report_dict(report: CheckReport) -> dict[str, Any]:
    """The ``--json`` form (``specray plan --from-check`` reads it)."""
    return {
        "ok": report.ok,
        "failures": list(report.failures),
        "groups": [
            {
                "scope": g.scope,
                "name": g.name,
                "node_ids": list(g.node_ids),
                "method": g.method,
                "ranks": g.ranks,
                "skipped": g.skipped,
                "peak_busbw_gbps": g.peak_busbw_gbps,
                "small_latency_us": g.small_latency_us,
                "rows": [asdict(row) for row in g.rows],
            }
            for g in report.groups
        ],
    }


def report_text(report: CheckReport) -> str:
    """One nccl-tests table per group, then the verdict."""
    parts: list[str] = []
    for group in report.groups:
        if group.skipped:
            parts.append(f"## {group.name}: skipped ({group.skipped})")
            continue
        parts.append(f"## {group.name}: {group.method}, {group.ranks} ranks")
        parts.append(format_table(group.rows))
        parts.append(
            f"# busbw at {group.rows[-1].size_bytes} B: {group.peak_busbw_gbps:.3f} GB/s; "
            f"smallest all-reduce: {group.small_latency_us:.1f} us"
        )
    if report.ok:
        parts.append("cluster check: OK")
    else:
        parts.append("cluster check: FAILED")
        parts.extend(f"  - {failure}" for failure in report.failures)
    return "\n".join(parts)
