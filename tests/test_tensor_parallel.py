"""Tensor-parallel targets (real gloo, real Ray, CPU): TP=N shards give TP=1's
logits and greedy tokens, hold about 1/N of the weights each, and a dead or
stalled shard surfaces as a TargetGroupError instead of a hang."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import ray
import torch
import torch.multiprocessing as mp
from cluster_helpers import loopback_cluster
from ray.cluster_utils import Cluster

from specray.actors.engine.target import (
    AcceptedPath,
    LocalTarget,
    Target,
    VerifyInput,
    VerifyOutput,
)
from specray.actors.model.loader import load_model
from specray.actors.parallel.distributed import find_free_port, init_tp_group
from specray.actors.workers.shard_model import ShardModel
from specray.actors.workers.target_shard import ShardSpec, TargetShardWorker
from specray.cluster.errors import TargetGroupError
from specray.cluster.local_ray import start_ray
from specray.cluster.target_group import ShardedTarget

PROMPT_A = [5, 17, 42, 8, 99, 3, 150]
PROMPT_B = [7, 7, 120, 64]
HIDDEN_LAYERS = (0, 2)
DirFactory = Callable[[str], Path]  # conftest's tiny_dir_factory
# One thread per shard; fail fast rather than wait long for a placement.
SHARD_OPTIONS: dict[str, Any] = dict(
    threads_per_shard=1, num_slots=4, max_len=64, start_timeout_s=120
)


# Batched prefill, a verify of drafts, then a rollback that rewrites them;
# then, for a model that verifies trees, a token tree and the next call
# keeping its accepted path (nodes 1, 2).
CHAIN_ROUNDS = [
    [VerifyInput("a", 0, PROMPT_A, 3), VerifyInput("b", 0, PROMPT_B, 1)],
    [VerifyInput("a", 7, [11, 12, 13, 14], 4), VerifyInput("b", 4, [9], 1)],
    [VerifyInput("b", 5, [30, 31], 2), VerifyInput("a", 8, [50, 51], 2)],  # a keeps 1 draft
]
TREE_ROUNDS = [
    [VerifyInput("a", 9, [60, 61, 62, 63], 4, parents=(-1, -1, 1))],
    [VerifyInput("a", 12, [70], 1, accepted=AcceptedPath(10, (1, 2)))],
]


def rounds_for(verifies_trees: bool) -> list[list[VerifyInput]]:
    return CHAIN_ROUNDS + (TREE_ROUNDS if verifies_trees else [])


def _rounds(target: Target) -> list[VerifyOutput]:
    rounds = rounds_for(target.verifies_trees)
    outputs = [out for inputs in rounds for out in target.verify(inputs, HIDDEN_LAYERS)]
    target.release("a")
    target.release("b")
    return outputs


def _greedy(target: Target, prompt: list[int], steps: int = 10) -> list[int]:
    generated: list[int] = []
    start, new = 0, list(prompt)
    for _ in range(steps):
        (out,) = target.verify([VerifyInput("greedy", start, new, 1)])
        token = int(out.logits[-1].argmax())
        generated.append(token)
        start, new = start + len(new), [token]
    target.release("greedy")
    return generated


def _reference(model_dir: Path) -> LocalTarget:
    return LocalTarget(load_model(model_dir), num_slots=4, max_len=64)


def _assert_same(ours: list[VerifyOutput], ref: list[VerifyOutput]) -> None:
    assert len(ours) == len(ref)
    for got, want in zip(ours, ref, strict=True):
        scale = max(want.logits.abs().max().item(), 1.0)
        assert got.logits.shape == want.logits.shape
        assert (got.logits - want.logits).abs().max().item() <= 1e-4 * scale
        if want.hidden_states is not None:
            assert got.hidden_states is not None
            hidden_scale = max(want.hidden_states.abs().max().item(), 1.0)
            # Rank 0 ships hidden states in bf16 (what a draft head reads):
            # equal up to bf16's rounding, 2^-9 of the magnitude, plus TP's.
            tolerance = (
                2**-8 if got.hidden_states.dtype == torch.bfloat16 else 1e-4
            ) * hidden_scale
            diff = (got.hidden_states.float() - want.hidden_states.float()).abs().max().item()
            assert diff <= tolerance


def _check_matches_tp1(target: Target, model_dir: Path) -> None:
    _assert_same(_rounds(target), _rounds(_reference(model_dir)))
    assert _greedy(target, PROMPT_A) == _greedy(_reference(model_dir), PROMPT_A)


# -- pure torch.distributed, no Ray ------------------------------------------


def _rank_main(rank: int, size: int, port: int, model_dir: str, out_dir: str) -> None:
    spec = ShardSpec(ShardModel(model_dir, num_slots=4, max_len=64), rank, size, "127.0.0.1", port)
    worker = TargetShardWorker(spec)
    outputs: list[VerifyOutput] = []
    for inputs in rounds_for(worker.target.verifies_trees):  # every rank runs each; rank 0 answers
        outputs += worker.verify(inputs, HIDDEN_LAYERS) or []
    assert bool(outputs) == (rank == 0)
    if rank == 0:
        torch.save(outputs, Path(out_dir) / "outputs.pt")
    worker.close()


def test_torch_distributed_tp2_matches_tp1(tiny_dir_factory: DirFactory, tmp_path: Path) -> None:
    model_dir = tiny_dir_factory("qwen2")
    port = find_free_port()
    mp.spawn(_rank_main, args=(2, port, str(model_dir), str(tmp_path)), nprocs=2)
    sharded = torch.load(tmp_path / "outputs.pt", weights_only=False)
    _assert_same(sharded, _rounds(_reference(model_dir)))


def _collectives_main(rank: int, size: int, port: int, out_dir: str) -> None:
    group = init_tp_group(rank, size, "127.0.0.1", port, timeout=30)
    parts = [torch.randn(4096, generator=torch.Generator().manual_seed(r)) for r in range(size)]
    summed = group.all_reduce(parts[rank].to(torch.bfloat16) * 100)
    gathered = group.all_gather(torch.full((2, 3), float(rank)), dim=1)
    if rank == 0:
        torch.save({"summed": summed, "gathered": gathered}, Path(out_dir) / "collectives.pt")
    group.close()


@pytest.mark.slow
def test_torch_dist_group_collectives_on_four_ranks(tmp_path: Path) -> None:
    size = 4
    mp.spawn(_collectives_main, args=(size, find_free_port(), str(tmp_path)), nprocs=size)
    got = torch.load(tmp_path / "collectives.pt")
    parts = [torch.randn(4096, generator=torch.Generator().manual_seed(r)) for r in range(size)]
    # bf16 partial sums are added in float32 and rounded once.
    want = sum(((p.to(torch.bfloat16) * 100).float() for p in parts), torch.zeros(4096))
    assert torch.equal(got["summed"], want.to(torch.bfloat16))
    assert torch.equal(
        got["gathered"], torch.arange(size).float().repeat_interleave(3).expand(2, -1)
    )


# -- Ray shards on an embedded loopback Ray -----------------------------------


@pytest.fixture(scope="module")
def qwen2_tp2(local_ray: None, tiny_dir_factory: DirFactory) -> Iterator[ShardedTarget]:
    target = ShardedTarget.create(tiny_dir_factory("qwen2"), tp=2, **SHARD_OPTIONS)
    yield target
    target.shutdown()


def test_tp2_matches_tp1(qwen2_tp2: ShardedTarget, tiny_dir_factory: DirFactory) -> None:
    assert [p.rank for p in qwen2_tp2.placements] == [0, 1]
    assert len({p.pid for p in qwen2_tp2.placements}) == 2
    _check_matches_tp1(qwen2_tp2, tiny_dir_factory("qwen2"))


def test_argmax_only_ships_token_ids_instead_of_logits(
    qwen2_tp2: ShardedTarget, tiny_dir_factory: DirFactory
) -> None:
    """Greedy requests ask for no logits: rank 0 answers with each row's
    argmax (what greedy acceptance reads), hidden states unchanged."""
    rounds = rounds_for(qwen2_tp2.verifies_trees)
    greedy_rounds = [[replace(item, argmax_only=True) for item in inputs] for inputs in rounds]
    ours = [out for inputs in greedy_rounds for out in qwen2_tp2.verify(inputs, HIDDEN_LAYERS)]
    qwen2_tp2.release("a")
    qwen2_tp2.release("b")
    ref = _rounds(_reference(tiny_dir_factory("qwen2")))
    for got, want in zip(ours, ref, strict=True):
        assert got.logits is None and got.argmax_ids is not None
        assert got.argmax_ids.dtype == torch.int64
        assert torch.equal(got.greedy_ids(), want.greedy_ids())
        assert got.num_rows == want.num_rows and got.hidden_states is not None
        with pytest.raises(ValueError, match="argmax ids only"):
            got.full_logits()


def test_tp2_param_bytes_are_halved(qwen2_tp2: ShardedTarget, tiny_dir_factory: DirFactory) -> None:
    model = load_model(tiny_dir_factory("qwen2"))
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    shards = qwen2_tp2.param_bytes()
    assert len(shards) == 2
    # Norms and the o/down biases are replicated, so a bit over half each.
    assert all(shard <= 0.55 * full for shard in shards)
    assert sum(shards) >= full


def test_bad_request_is_the_callers_error(qwen2_tp2: ShardedTarget) -> None:
    """Every shard rejects it alike: re-raised as itself, group still usable."""
    with pytest.raises(ValueError, match="only 0 positions are cached"):
        qwen2_tp2.verify([VerifyInput("fresh", 3, [1, 2], 1)])
    qwen2_tp2.release("fresh")
    assert qwen2_tp2.ping() == [0, 1]


def test_killed_shard_raises_target_group_error(
    local_ray: None, tiny_dir_factory: DirFactory
) -> None:
    target = ShardedTarget.create(tiny_dir_factory("qwen2"), tp=2, timeout_s=20, **SHARD_OPTIONS)
    try:
        target.verify([VerifyInput("r", 0, PROMPT_A, 1)])
        os.kill(target.placements[1].pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(TargetGroupError) as caught:
            target.verify([VerifyInput("r", len(PROMPT_A), [4], 1)])
        assert time.monotonic() - began < 30  # a bound, not a benchmark
        assert caught.value.reason in ("died", "failed")
        # Broken stays broken until a gang restart: no call reaches the shards.
        with pytest.raises(TargetGroupError):
            target.release("r")
    finally:
        target.shutdown()


@pytest.mark.slow
def test_failed_start_raises_and_frees_the_placement_group(local_ray: None, tmp_path: Path) -> None:
    before = set(ray.util.placement_group_table())
    with pytest.raises(FileNotFoundError):  # every shard fails alike: re-raised as itself
        ShardedTarget.create(tmp_path, tp=2, **SHARD_OPTIONS)
    after = ray.util.placement_group_table()
    (new_group,) = set(after) - before
    assert after[new_group]["state"] == "REMOVED"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("family", "tp"),
    [
        ("qwen2", 4),  # 2 KV heads over 4 ranks: each KV head replicated twice
        ("gemma3", 2),  # 1 KV head, sliding windows, tied embeddings
    ],
)
def test_more_shards_and_families_match_tp1(
    local_ray: None,
    tiny_dir_factory: DirFactory,
    family: str,
    tp: int,
) -> None:
    model_dir = tiny_dir_factory(family)
    with ShardedTarget.create(model_dir, tp=tp, **SHARD_OPTIONS) as target:
        _check_matches_tp1(target, model_dir)


@pytest.mark.slow
def test_stalled_shard_times_out_then_gang_restart(
    local_ray: None, tiny_dir_factory: DirFactory
) -> None:
    model_dir = tiny_dir_factory("qwen2")
    options = dict(SHARD_OPTIONS, tp=2, timeout_s=5)
    target = ShardedTarget.create(model_dir, **options)
    stalled = target.placements[1].pid
    try:
        os.kill(stalled, signal.SIGSTOP)  # alive but silent: rank 0 waits in a collective
        began = time.monotonic()
        with pytest.raises(TargetGroupError) as caught:
            target.verify([VerifyInput("r", 0, PROMPT_A, 1)])
        assert time.monotonic() - began < 30
        assert caught.value.reason in ("timeout", "failed")
        assert 1 in caught.value.ranks
    finally:
        os.kill(stalled, signal.SIGKILL)
        target.shutdown()
    # Gang restart: a fresh group over the same checkpoint serves again.
    with ShardedTarget.create(model_dir, **options) as restarted:
        _check_matches_tp1(restarted, model_dir)


# -- a fake multi-node cluster; last, since it replaces the embedded Ray ------


@pytest.fixture
def three_node_cluster(local_ray: None) -> Iterator[Cluster]:
    """Head (no CPUs) plus two worker nodes, each offering its own resource."""
    nodes = [{"num_cpus": 1, "resources": {name: 1}} for name in ("node_a", "node_b")]
    with loopback_cluster("srtp", nodes) as cluster:
        start_ray(address=cluster.address)
        yield cluster


@pytest.mark.slow
def test_one_shard_per_node_matches_tp1(
    three_node_cluster: Cluster, tiny_dir_factory: DirFactory
) -> None:
    nodes = [node for node in ray.nodes() if node["Alive"]]
    assert len(nodes) == 3
    assert {node["NodeManagerAddress"] for node in nodes} == {"127.0.0.1"}
    node_of = {
        resource: node["NodeID"]
        for node in nodes
        for resource in node["Resources"]
        if resource in ("node_a", "node_b")
    }
    model_dir = tiny_dir_factory("qwen2")
    with ShardedTarget.create(
        model_dir,
        tp=2,
        strategy="STRICT_SPREAD",
        bundle_resources=({"node_a": 1}, {"node_b": 1}),
        **SHARD_OPTIONS,
    ) as target:
        assert [p.node_id for p in target.placements] == [node_of["node_a"], node_of["node_b"]]
        _check_matches_tp1(target, model_dir)
