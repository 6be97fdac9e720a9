"""Tensor parallelism over quantized weights: every rank reads and keeps only
its slice of the GGUF blocks, and TP=2 over real gloo groups computes what
one process computes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from tiny_gguf import write_tiny_qwen2

from specray.actors.engine.target import LocalTarget, VerifyInput, VerifyOutput
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.gguf_source import GGUFWeightSource
from specray.actors.model.loader import load_model
from specray.actors.parallel.distributed import find_free_port
from specray.actors.parallel.quantized import GroupAffine
from specray.actors.parallel.span import Span
from specray.actors.workers.shard_model import ShardModel
from specray.actors.workers.target_shard import ShardSpec, TargetShardWorker

ROUNDS = [
    [VerifyInput("a", 0, [5, 17, 42, 8, 99, 3, 150], 3), VerifyInput("b", 0, [7, 7, 120], 1)],
    [VerifyInput("a", 7, [11, 12, 13, 14], 4), VerifyInput("b", 3, [9], 1)],
]


class RankOnly:
    """Rank ``rank`` of a group of ``size``, for building and loading a
    shard's layers in one process (no forward pass, so no collectives)."""

    def __init__(self, rank: int, size: int) -> None:
        self.rank, self.size = rank, size

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        raise AssertionError("loading runs no collectives")

    def all_gather(self, tensor: torch.Tensor, dim: int) -> torch.Tensor:
        raise AssertionError("loading runs no collectives")


class RecordingSource(GGUFWeightSource):
    """Remembers the extent of every quantized read."""

    def __init__(self, gguf_path: Path, config: ModelConfig) -> None:
        super().__init__(gguf_path, config)
        self.reads: dict[str, tuple[int, int]] = {}  # name -> (rows, cols) handed out

    def read_quantized(self, name: str, span: Span | None = None) -> GroupAffine | None:
        matrix = super().read_quantized(name, span)
        if matrix is not None:
            self.reads[name] = matrix.shape
        return matrix


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_qwen2(tmp_path_factory.mktemp("tp"))


def _load(
    model_dir: Path, group: RankOnly | None
) -> tuple[DecoderModel, dict[str, tuple[int, int]]]:
    config = ModelConfig.from_pretrained(model_dir)
    model = DecoderModel(config, torch.float32, group)
    with RecordingSource(model_dir / "model.gguf", config) as source:
        model.load(source)
    return model, source.reads


def _param_bytes(model: DecoderModel) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def test_each_rank_reads_and_holds_only_its_slice(model_dir: Path) -> None:
    full, full_reads = _load(model_dir, None)
    for rank in range(2):
        shard, reads = _load(model_dir, RankOnly(rank, 2))
        assert reads.keys() == full_reads.keys()
        for name, (rows, cols) in reads.items():
            whole_rows, whole_cols = full_reads[name]
            split_cols = name.endswith(("o_proj.weight", "down_proj.weight"))
            assert (rows, cols) == (
                (whole_rows, whole_cols // 2) if split_cols else (whole_rows // 2, whole_cols)
            ), name
        assert _param_bytes(shard) <= 0.55 * _param_bytes(full)
        # Each rank's low-bit weights are its slice of the unsharded ones.
        for got, want, dim in [
            (shard.blocks[0].mlp.down_proj, full.blocks[0].mlp.down_proj, 1),
            (shard.blocks[1].self_attn.o_proj, full.blocks[1].self_attn.o_proj, 1),
            (shard.lm_head, full.lm_head, 0),
        ]:
            size = got.weights.dequantize().shape[dim]
            want_slice = want.weights.dequantize().narrow(dim, rank * size, size)
            assert torch.equal(got.weights.dequantize(), want_slice)


def _rank_main(rank: int, size: int, port: int, model_dir: str, out_dir: str) -> None:
    model = ShardModel(model_dir, weights="gguf", num_slots=4, max_len=64)
    spec = ShardSpec(model, rank, size, "127.0.0.1", port)
    worker = TargetShardWorker(spec)
    outputs: list[VerifyOutput] = []
    for inputs in ROUNDS:
        outputs += worker.verify(inputs) or []
    if rank == 0:
        torch.save(outputs, Path(out_dir) / "outputs.pt")
    worker.close()


def test_gloo_tp2_on_gguf_weights_matches_one_process(model_dir: Path, tmp_path: Path) -> None:
    mp.spawn(_rank_main, args=(2, find_free_port(), str(model_dir), str(tmp_path)), nprocs=2)
    sharded: list[VerifyOutput] = torch.load(tmp_path / "outputs.pt", weights_only=False)
    single = LocalTarget(load_model(model_dir, torch.float32, weights="gguf"), 4, 64)
    reference = [out for inputs in ROUNDS for out in single.verify(inputs)]
    assert len(sharded) == len(reference)
    for got, want in zip(sharded, reference, strict=True):
        got_logits, want_logits = got.full_logits(), want.full_logits()
        assert (got_logits - want_logits).abs().max() <= 1e-4 * want_logits.abs().max()
        assert torch.equal(got.greedy_ids(), want.greedy_ids())
