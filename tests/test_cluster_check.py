"""`specray cluster check`: nccl-tests' output and busbw definition, the
thresholds, and a real run on a fake three-node Ray cluster (gloo on
loopback) through the CLI."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from cluster_helpers import loopback_cluster
from ray.cluster_utils import Cluster

from specray.cluster.preflight.nccl_tests import (
    AllReduceRow,
    bus_factor,
    format_table,
    parse_all_reduce_perf,
    parse_size,
    row_from_time,
    sweep_sizes,
)
from specray.cluster.preflight.report import GroupResult, Thresholds, evaluate, report_text
from specray.deploy.cli import main

# all_reduce_perf -b 8 -e 128M -f 2 -g 8 on one 8-GPU node, in nccl-tests'
# documented layout (synthesised for this test, not captured on hardware).
SAMPLE = Path(__file__).parent / "data" / "all_reduce_perf_8xh200.txt"

# Older nccl-tests print no root column; with -c 0 #wrong is N/A. NCCL's own
# log lines are interleaved when NCCL_DEBUG=INFO.
OLD_LAYOUT = Path(__file__).parent / "data" / "all_reduce_perf_old_layout.txt"


def test_parses_the_sample_and_its_busbw_follows_the_definition() -> None:
    run = parse_all_reduce_perf(SAMPLE.read_text())
    assert run.ranks == 8 and run.hosts == ("h200-node-01",)
    assert run.avg_busbw_gbps == pytest.approx(102.381)
    sizes = [row.size_bytes for row in run.rows]
    assert sizes == [8 * 2**i for i in range(25)]  # 8 B .. 128 MiB, factor 2
    assert all(row.count == row.size_bytes // 4 and row.dtype == "float" for row in run.rows)
    largest = run.rows[-1]
    assert (largest.time_us, largest.algbw_gbps, largest.busbw_gbps) == (544.4, 246.54, 431.45)
    for row in run.rows:
        if row.size_bytes >= 1 << 20:  # enough printed digits to compare
            assert row.algbw_gbps == pytest.approx(row.size_bytes / row.time_us / 1e3, rel=2e-3)
            assert row.busbw_gbps == pytest.approx(row.algbw_gbps * 2 * 7 / 8, rel=2e-3)


def test_parses_the_older_layout_and_skips_nccl_log_lines() -> None:
    run = parse_all_reduce_perf(OLD_LAYOUT.read_text())
    assert [(r.size_bytes, r.time_us, r.busbw_gbps, r.wrong) for r in run.rows] == [
        (1048576, 20.0, 52.43, 0),
        (2097152, 35.0, 59.92, 0),
    ]
    assert run.hosts == ("gpu-a",) and run.avg_busbw_gbps is None


def test_a_failed_run_is_an_error() -> None:
    failed = "# nThread 1 nGpus 8\ngpu-a: Test NCCL failure common.cu:1005 'unhandled cuda error'\n"
    with pytest.raises(ValueError, match="no all_reduce_perf result rows"):
        parse_all_reduce_perf(failed)


def test_busbw_formula_on_hand_computed_values() -> None:
    assert [bus_factor(n) for n in (1, 2, 4, 8)] == [0.0, 1.0, 1.5, 1.75]
    row = row_from_time(1 << 20, 4, "float", 1e-3, ranks=4)
    assert row.count == 262144 and row.time_us == pytest.approx(1000.0)
    assert row.algbw_gbps == pytest.approx(1.048576)  # 1 MiB in 1 ms
    assert row.busbw_gbps == pytest.approx(1.048576 * 1.5)
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        bus_factor(0)


def test_sizes_follow_nccl_tests_syntax() -> None:
    assert [parse_size(s) for s in ("8", "64K", "128M", "1G", "2kb")] == [
        8,
        65536,
        128 << 20,
        1 << 30,
        2048,
    ]
    assert sweep_sizes(8, 64, 2, 4) == [8, 16, 32, 64]
    assert sweep_sizes(6, 100, 4, 4) == [4, 24, 96]  # whole elements
    with pytest.raises(ValueError, match="size must look like"):
        parse_size("12X")
    with pytest.raises(ValueError, match="--max-bytes must be >= --min-bytes"):
        sweep_sizes(64, 8, 2, 4)
    with pytest.raises(ValueError, match="--factor must be >= 2, got 1"):
        sweep_sizes(8, 64, 1, 4)


def _group(scope: Any, name: str, busbw: float, latency_us: float, wrong: int = 0) -> GroupResult:
    rows = (
        AllReduceRow(8, 2, "float", latency_us, 0.0, 0.0),
        AllReduceRow(1 << 20, 1 << 18, "float", 100.0, busbw / 1.75, busbw, wrong),
    )
    return GroupResult(scope, name, ("n",), "torch-nccl", 8, rows)


def test_thresholds_fail_with_the_group_value_and_flag() -> None:
    groups = [
        _group("node", "node 10.0.0.1 (aaaa)", busbw=300.0, latency_us=12.0),
        _group("node", "node 10.0.0.2 (bbbb)", busbw=90.0, latency_us=60.0),
        _group("cross-node", "cross-node (2 nodes, one rank each)", busbw=20.0, latency_us=25.0),
    ]
    thresholds = Thresholds(min_busbw_gbps=200, min_cross_busbw_gbps=30, max_latency_us=50)
    report = evaluate(groups, thresholds)
    assert not report.ok
    assert report.failures == (
        "node 10.0.0.2 (bbbb): busbw 90.000 GB/s at 1048576 B is below --min-busbw-gbps 200",
        "node 10.0.0.2 (bbbb): all-reduce of 8 B took 60.0 us, above --max-latency-us 50",
        "cross-node (2 nodes, one rank each): busbw 20.000 GB/s at 1048576 B is below "
        "--min-cross-busbw-gbps 30",
    )
    assert "cluster check: FAILED" in report_text(report)
    assert evaluate(groups, Thresholds(min_busbw_gbps=80)).ok
    broken = evaluate([_group("node", "node x", 300.0, 10.0, wrong=3)], Thresholds())
    assert broken.failures == (
        "node x: nccl-tests found 3 wrong values at 1048576 B (a broken GPU or link)",
    )
    with pytest.raises(ValueError, match="--max-latency-us must be > 0, got -1"):
        Thresholds(max_latency_us=-1)


def test_table_has_nccl_tests_columns() -> None:
    table = format_table(parse_all_reduce_perf(SAMPLE.read_text()).rows)
    header = table.splitlines()[0].split()
    assert header == ["#", "size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong"]
    assert table.splitlines()[-1].split()[:3] == ["134217728", "33554432", "float"]


@pytest.fixture
def three_nodes() -> Iterator[Cluster]:
    """Head plus two nodes, all on 127.0.0.1, with Ray's files in a private dir."""
    with loopback_cluster("srpf", [{"num_cpus": 1}] * 2) as cluster:
        yield cluster


@pytest.mark.slow
def test_check_measures_every_node_and_across_nodes(
    three_nodes: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["cluster", "check", "--address", three_nodes.address, "--max-bytes", "4K"]
    argv += ["--iters", "3", "--warmup", "1", "--json", "--min-cross-busbw-gbps", "1e6"]
    code = main(argv)
    out, err = capsys.readouterr()
    report = json.loads(out)
    assert not ray.is_initialized()  # the CLI leaves the way it came
    nodes = [g for g in report["groups"] if g["scope"] == "node"]
    (cross,) = [g for g in report["groups"] if g["scope"] == "cross-node"]
    assert len(nodes) == 3 and len({g["node_ids"][0] for g in nodes}) == 3
    assert sorted(cross["node_ids"]) == sorted(g["node_ids"][0] for g in nodes)
    assert cross["ranks"] == 3
    for group in [*nodes, cross]:
        assert group["method"] == "torch-gloo" and group["skipped"] is None
        sizes = [row["size_bytes"] for row in group["rows"]]
        assert sizes == [8 * 2**i for i in range(10)]  # 8 B .. 4 KiB
        for row in group["rows"]:
            assert row["dtype"] == "float" and row["count"] == row["size_bytes"] // 4
            assert row["algbw_gbps"] == pytest.approx(row["size_bytes"] / row["time_us"] / 1e3)
            assert row["busbw_gbps"] == pytest.approx(
                row["algbw_gbps"] * bus_factor(group["ranks"])
            )
    assert all(g["ranks"] == 2 for g in nodes)
    # Only the cross-node group had a threshold, and loopback gloo misses it.
    assert code == 1 and report["ok"] is False
    (failure,) = report["failures"]
    assert failure.startswith("cross-node (3 nodes, one rank each): busbw ")
    assert "below --min-cross-busbw-gbps 1e+06" in failure
    assert failure in err
