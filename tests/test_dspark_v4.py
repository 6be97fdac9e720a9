"""DSpark for a DeepSeek-V4 target: the drafter stored beside the target under
``mtp.*`` (sliding-window MoE layers on hyper-connection streams), its
drafting path against its training forward, the window, and lossless
serving in process.

No V4-DSpark checkpoint or reference code is public, so the layout is ours
(docs/dspark.md) and the checks are self-consistency and losslessness, not
agreement with DeepSeek's numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from dspark_helpers import serve_in_process
from tiny_v4 import VOCAB, hf_greedy, save_v4_dspark, v4_config

from specray.actors.drafting.build import build_drafter
from specray.actors.drafting.dspark.checkpoint import load_dspark
from specray.actors.drafting.dspark.config import DSparkConfig
from specray.actors.drafting.dspark.drafter import DSparkDrafter
from specray.actors.drafting.dspark.fresh import fresh_dspark
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.dspark.v4_block import V4
from specray.actors.drafting.spec import DrafterSpec
from specray.actors.engine.request import GenerationRequest
from specray.actors.model.config import ModelConfig, UnsupportedModelError
from specray.actors.sampling.params import StoppingCriteria

MAX_LEN = 96
BLOCK = 4
WINDOW = v4_config().sliding_window  # 6: shorter than the contexts below

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_v4_dspark(tmp_path_factory.mktemp("v4dspark"), seed=0, block_size=BLOCK)


@pytest.fixture(scope="module")
def model(v4_dir: Path) -> DSparkModel:
    return load_dspark(v4_dir, target_dir=v4_dir)


def test_config_reads_the_drafter_beside_the_target(v4_dir: Path) -> None:
    config = DSparkConfig.load(v4_dir)
    target = ModelConfig.from_pretrained(v4_dir)
    hyper = target.hyper_connections
    assert hyper is not None
    assert config.decoder.num_layers == 2 and config.num_target_layers == target.num_layers
    assert config.fused_size == 2 * hyper.streams * target.hidden_size  # streams, flattened
    assert config.sliding_window == WINDOW and config.block_size == BLOCK
    config.check_target(target)


def test_the_layers_are_v4_blocks_under_mtp(model: DSparkModel) -> None:
    assert model.family is V4
    names = dict(model.named_parameters())
    assert any(name.startswith("layers.0.layer.mlp.experts") for name in names)
    assert "residual.head.fn" in names  # the drafter's own hyper head


def _features(model: DSparkModel, length: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, length, model.config.fused_size, generator=gen)


def _drafted(
    model: DSparkModel, features: torch.Tensor, anchor: int, anchor_id: int
) -> torch.Tensor:
    """Base logits ``[γ, vocab]`` of the drafting path: the context fed to
    the cache, then one block forward."""
    cache = model.new_cache(1, MAX_LEN)
    model.feed_context(
        features[0, :anchor], torch.zeros(anchor, dtype=torch.int64), torch.arange(anchor), cache
    )
    out = model.draft_block(
        torch.tensor([anchor_id]), torch.tensor([anchor]), cache, [0], torch.tensor([0])
    )
    return out.base_logits[0]


def test_drafting_matches_the_training_forward(model: DSparkModel) -> None:
    """Every anchor's block, teacher forced in one forward (training), gives
    the logits drafting from that anchor gives (cache, one block): the
    context, the window and the streams agree between the two paths."""
    length = 3 * WINDOW
    features = _features(model, length, seed=1)
    anchors = torch.tensor([[2, WINDOW, 2 * WINDOW + 1, length - 1]])
    gen = torch.Generator().manual_seed(2)
    anchor_ids = torch.randint(3, VOCAB, anchors.shape, generator=gen)
    previous = torch.randint(3, VOCAB, (*anchors.shape, BLOCK), generator=gen)
    forced = model.teacher_forced(features, anchor_ids, anchors, previous)
    for a in range(anchors.shape[1]):
        base = _drafted(model, features, int(anchors[0, a]), int(anchor_ids[0, a]))
        drafted = model.markov_logits(base, previous[0, a])
        torch.testing.assert_close(drafted, forced.draft_logits[0, a], rtol=1e-4, atol=1e-4)


def test_the_window_hides_older_context(model: DSparkModel) -> None:
    anchor = 3 * WINDOW
    features = _features(model, anchor, seed=3)
    base = _drafted(model, features, anchor, 7)
    old = features.clone()
    old[0, : anchor - WINDOW + 1] += 5.0  # before the window of every block query
    torch.testing.assert_close(_drafted(model, old, anchor, 7), base)
    recent = features.clone()
    recent[0, anchor - 2] += 5.0
    assert not torch.allclose(_drafted(model, recent, anchor, 7), base)


def _prompts() -> list[list[int]]:
    gen = torch.Generator().manual_seed(5)
    return [torch.randint(3, VOCAB, (n,), generator=gen).tolist() for n in (5, 11, 19)]


def _generate(v4_dir: Path, drafter: DSparkDrafter | None, k: int) -> dict[str, list[int]]:
    requests = [
        GenerationRequest(f"r{i}", p, stopping=StoppingCriteria(12, ignore_eos=True))
        for i, p in enumerate(_prompts())
    ]
    out, drafted = serve_in_process(v4_dir, drafter, k, requests, MAX_LEN)
    assert drafter is None or drafted > 0
    return out


def test_greedy_output_equals_target_only_and_transformers(v4_dir: Path) -> None:
    """Served through ``--draft dspark:DIR`` on the V4 target: drafts of the
    whole block are verified, and the output is the target's own."""
    drafter = build_drafter(DrafterSpec.parse(f"dspark:{v4_dir}"), "float32", 4, MAX_LEN, v4_dir)
    assert isinstance(drafter, DSparkDrafter) and drafter.model.family is V4
    spec = _generate(v4_dir, drafter, BLOCK)
    assert spec == _generate(v4_dir, None, 0)
    for i, prompt in enumerate(_prompts()):
        assert spec[f"r{i}"] == hf_greedy(v4_dir, prompt, 12)


def test_training_one_for_a_v4_target_is_refused_by_name(v4_dir: Path) -> None:
    with pytest.raises(UnsupportedModelError, match="DeepSeek-V4 target is not supported"):
        fresh_dspark(v4_dir)
