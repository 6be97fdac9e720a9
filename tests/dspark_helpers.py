"""A tiny DSpark drafter and tiny draft data for the DSpark tests."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import VOCAB

from specray.actors.drafting.base import Drafter
from specray.actors.drafting.dspark.fresh import fresh_dspark
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.drafting.head.data import DraftData, DraftDataWriter
from specray.actors.drafting.head.datagen import GenerationSettings, generate_samples
from specray.actors.engine.engine import EngineConfig, SpecEngine
from specray.actors.engine.request import GenerationRequest
from specray.actors.engine.target import LocalTarget
from specray.actors.model.loader import load_model

LAYERS = (0, 1)


def tiny_dspark(target_dir: Path, seed: int = 0) -> DSparkModel:
    """One layer, a block of 3, reading both layers of a tiny target."""
    model, _ = fresh_dspark(
        target_dir,
        num_layers=1,
        block_size=3,
        target_layer_ids=LAYERS,
        markov_rank=8,
        init_std=0.2,
        seed=seed,
    )
    return model


def tiny_draft_data(model_dir: Path, directory: Path, count: int = 16) -> DraftData:
    """``count`` greedy and sampled answers of the tiny target to random prompts."""
    settings = GenerationSettings(LAYERS, eos_token_ids=(), max_tokens=20, batch_size=8, top_k=8)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(3, VOCAB, (3 + i % 5,), generator=gen).tolist() for i in range(count)]
    writer = DraftDataWriter(directory, {"generation": {"hidden_layers": list(LAYERS)}})
    generate_samples(load_model(model_dir), prompts, settings, lambda _, s: writer.add(s))
    writer.close()
    return DraftData(directory)


def serve_in_process(
    target_dir: Path,
    drafter: Drafter | None,
    k: int,
    requests: list[GenerationRequest],
    max_len: int = 128,
) -> tuple[dict[str, list[int]], int]:
    """Each request's tokens from the engine (fixed k, 4 slots), and the
    tokens drafted in all."""
    target = LocalTarget(load_model(target_dir), num_slots=4, max_len=max_len)
    engine = SpecEngine(target, drafter, None, (), EngineConfig(4, k, adaptive=False))
    out: dict[str, list[int]] = {r.request_id: [] for r in requests}
    drafted = 0
    for chunk in engine.generate(requests):
        out[chunk.request_id] += chunk.token_ids
        if chunk.finished:
            drafted += chunk.stats.draft_tokens
    assert not engine.running and target.num_active == 0
    return out, drafted
