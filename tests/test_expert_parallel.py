"""Expert parallelism on a DeepSeek-V4 target (real gloo, real Ray, CPU).

A group of ``tp × ep`` shards runs the model split as one process runs it:
verify rounds with rollbacks give one process's logits, greedy decoding with
every drafter gives the no-cache loop's tokens, and each shard holds and
reads only its share of the routed experts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from references import greedy_reference
from test_tensor_parallel import HIDDEN_LAYERS, PROMPT_A, _assert_same, _greedy, _rounds
from tiny_v4 import CSA, HCA, SLIDING, save_tiny_v4, save_v4_draft

from specray.actors.drafting.build import build_drafter
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.parallel.expert import ExpertShard, PartialSum, ShardGrid
from specray.actors.parallel.span import Span
from specray.actors.parallel.weights import WeightSource
from specray.actors.sampling.params import StoppingCriteria
from specray.cluster.target_group import ShardedTarget

EXPERTS = 8  # split 2 and 4 ways
RAY_CPUS = 8  # logical, for the local_ray fixture: 4 shards plus drafters
pytestmark = pytest.mark.usefixtures("one_torch_thread")
MAX_TOKENS = 12
MAX_LEN = 64
SHARD_OPTIONS = dict(threads_per_shard=1, num_slots=4, max_len=MAX_LEN, start_timeout_s=180)


def save_moe_v4(directory: Path, seed: int, **overrides: object) -> Path:
    """A tiny V4 with hash-routed and learned-routed MoE layers and 8 experts."""
    return save_tiny_v4(
        directory,
        seed=seed,
        n_routed_experts=EXPERTS,
        layer_types=[SLIDING, CSA, HCA, CSA],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        **overrides,
    )


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_moe_v4(tmp_path_factory.mktemp("v4ep"), seed=5, mtp=True)


class RecordingSource(WeightSource):
    """Remembers every read: which tensor, along which dim, which rows or columns."""

    def __init__(self, model_dir: Path, aliases: tuple[tuple[str, str], ...]) -> None:
        super().__init__(model_dir, aliases)
        self.reads: list[tuple[str, Span | None]] = []

    def read(self, name: str, span: Span | None = None) -> torch.Tensor:
        self.reads.append((name, span))
        return super().read(name, span)


@pytest.mark.parametrize(("tp", "ep"), [(1, 2), (2, 2), (1, 4)])
def test_each_rank_reads_and_holds_only_its_experts(v4_dir: Path, tp: int, ep: int) -> None:
    config = ModelConfig.from_pretrained(v4_dir)
    assert config.moe is not None
    inter = config.moe.intermediate_size
    grid = ShardGrid(tp, ep)
    full = load_model(v4_dir)
    tiles: Counter[tuple[int, int]] = Counter()
    for rank in range(grid.size):
        combine = PartialSum(rank, grid.size)
        shard = ExpertShard.on_grid(grid, rank, combine)
        model = DecoderModel(config, torch.float32, PartialSum(grid.column(rank), tp), shard)
        with RecordingSource(v4_dir, config.weight_aliases) as source:
            model.load(source)
        routed = [r for r in source.reads if ".experts." in r[0]]
        experts = {int(name.split(".experts.")[1].split(".")[0]) for name, _ in routed}
        per_row = EXPERTS // ep
        first = grid.row(rank) * per_row
        assert experts == set(range(first, first + per_row))  # no other expert is read
        columns = (grid.column(rank) * inter // tp, (grid.column(rank) + 1) * inter // tp)
        for name, span in routed:
            assert span == Span(1 if ".w2." in name else 0, *columns)
        for layer, mine in zip(full.layers, model.layers, strict=True):
            for local, expert in enumerate(mine.mlp.experts.owned):
                whole = layer.mlp.experts.expert(mine.mlp.experts.first + local)
                gate_up = whole.gate_up.weight.view(2, inter, -1)[:, slice(*columns)]
                assert torch.equal(expert.gate_up.weight, gate_up.reshape(-1, gate_up.shape[-1]))
                assert torch.equal(expert.down.weight, whole.down.weight[:, slice(*columns)])
                tiles[(id(layer), mine.mlp.experts.first + local)] += 1
    # The shares tile the whole: every expert's columns held exactly tp times over.
    moe_layers = [layer for layer in full.layers if layer.mlp.experts.owned]
    assert set(tiles.values()) == {tp}
    assert len(tiles) == EXPERTS * len(moe_layers)


def test_expert_parallelism_needs_an_moe_model(tiny_dir_factory) -> None:  # type: ignore[no-untyped-def]
    config = ModelConfig.from_pretrained(tiny_dir_factory("qwen2"))
    shard = ExpertShard.on_grid(ShardGrid(1, 2), 0, PartialSum(0, 2))
    with pytest.raises(ValueError, match="needs a mixture-of-experts model"):
        DecoderModel(config, torch.float32, None, shard)


def test_uneven_splits_are_refused(v4_dir: Path) -> None:
    config = ModelConfig.from_pretrained(v4_dir)
    shard = ExpertShard.on_grid(ShardGrid(1, 3), 0, PartialSum(0, 3))
    with pytest.raises(ValueError, match="8 routed experts cannot be split over ep=3"):
        DecoderModel(config, torch.float32, None, shard)


# -- Ray shards on an embedded loopback Ray -------------------------------------


@pytest.fixture(scope="module", params=[(1, 2), (2, 2)], ids=["ep2", "tp2-ep2"])
def group(request: pytest.FixtureRequest, local_ray: None, v4_dir: Path) -> Iterator[ShardedTarget]:
    tp, ep = request.param
    target = ShardedTarget.create(
        v4_dir,
        tp=tp,
        ep=ep,
        time_collectives=True,
        **SHARD_OPTIONS,  # type: ignore[arg-type]
    )
    yield target
    target.shutdown()


def test_group_matches_one_process(group: ShardedTarget, v4_dir: Path) -> None:
    """Batched prefill, verify, and a rollback that rewrites drafts."""
    assert [p.rank for p in group.placements] == list(range(group.config.shards))
    reference = LocalTarget(load_model(v4_dir), num_slots=4, max_len=MAX_LEN)
    group.stats(reset=True)
    _assert_same(_rounds(group), _rounds(reference))
    stats = group.stats(reset=True)
    # Each MoE layer's one collective is the combine; tp2 adds attention's.
    moe_calls = 4 * 3  # layers × rounds
    assert all(s.expert_collectives is not None for s in stats)
    assert {s.expert_collectives.all_reduce_calls for s in stats} == {moe_calls}  # type: ignore[union-attr]
    tp_calls = {s.collectives.all_reduce_calls for s in stats}  # type: ignore[union-attr]
    # Attention's o_b per layer, and the vocabulary-split embedding's (tp > 1).
    assert tp_calls == {(4 + (group.config.tp > 1)) * 3}
    assert _greedy(group, PROMPT_A) == _greedy(reference, PROMPT_A)
    assert HIDDEN_LAYERS  # the rounds compared hidden states too


TP_SPLIT = ("q_b_proj", "o_a_proj", "o_b_proj", "sinks", "embed_tokens", "lm_head")


def test_each_shard_holds_its_share_of_the_experts(group: ShardedTarget, v4_dir: Path) -> None:
    """Experts (routed and shared) split over every shard, query heads and
    vocabulary over a row, the rest (KV head, compressors, indexer, router,
    norms, hyper-connections) on every shard."""
    nbytes = {"experts": 0, "row": 0, "replicated": 0}
    for name, param in load_model(v4_dir).named_parameters():
        size = param.numel() * param.element_size()
        if ".experts." in name or "shared_experts" in name:
            nbytes["experts"] += size
        elif any(part in name for part in TP_SPLIT) and ".indexer." not in name:
            nbytes["row"] += size
        else:
            nbytes["replicated"] += size
    tp, shards = group.config.tp, group.config.shards
    share = nbytes["experts"] / shards + nbytes["row"] / tp + nbytes["replicated"]
    assert group.param_bytes() == [share] * shards


def _engine_outputs(
    target: ShardedTarget | LocalTarget,
    drafter_spec: DrafterSpec | None,
    v4_dir: Path,
    draft_dir: Path,
) -> dict[str, list[int]]:
    drafter = None
    if drafter_spec is not None:
        drafter = build_drafter(drafter_spec, "float32", 4, MAX_LEN, v4_dir)
    config = EngineConfig(max_batch=4, num_speculative_tokens=3, adaptive=False)
    engine = SpecEngine(target, drafter, None, (), config)
    outputs: dict[str, list[int]] = {}
    for chunk in engine.generate(_requests()):
        outputs.setdefault(chunk.request_id, []).extend(chunk.token_ids)
    return outputs


def _requests() -> list[GenerationRequest]:
    gen = torch.Generator().manual_seed(21)
    requests = []
    for i, length in enumerate((4, 11, 17)):
        body = torch.randint(3, 160, (length,), generator=gen).tolist()
        stop = StoppingCriteria(max_tokens=MAX_TOKENS, ignore_eos=True)
        requests.append(GenerationRequest(f"e{i}", body + body[:5], stopping=stop))
    return requests


@pytest.fixture(scope="module")
def draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_v4_draft(tmp_path_factory.mktemp("v4epdraft"), seed=8)


@pytest.fixture(scope="module")
def reference(v4_dir: Path) -> dict[str, list[int]]:
    prompts = {r.request_id: r.prompt_ids for r in _requests()}
    return greedy_reference(v4_dir, prompts, MAX_TOKENS)


@pytest.mark.slow
def test_greedy_with_every_drafter_equals_the_no_cache_loop(
    group: ShardedTarget, v4_dir: Path, draft_dir: Path, reference: dict[str, list[int]]
) -> None:
    drafters = [
        None,
        DrafterSpec("ngram", max_ngram=3),
        DrafterSpec("model", str(draft_dir)),
        DrafterSpec("mtp"),
        DrafterSpec("hybrid", str(draft_dir), max_ngram=3),
    ]
    for spec in drafters:
        assert _engine_outputs(group, spec, v4_dir, draft_dir) == reference, spec
    assert group.active_slots() == [0] * group.config.shards
