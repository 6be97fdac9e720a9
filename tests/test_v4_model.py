"""DeepSeek-V4 in our model core against the causal definition: the logits at
position t are the model's last-position logits on tokens 0..t alone.

Every path (prefill, decode, multi-token verify chunks, mixed batches) must
reproduce transformers' from-scratch logits to fp32 rounding. transformers'
own multi-token forward and cached decode agree with that definition only
once top-k ties in the CSA indexer are broken by index (see tiny_v4), which
is the rule our indexer follows.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp
from test_tensor_parallel import _assert_same as assert_same_outputs
from test_tensor_parallel import _rank_main as tp_rank_main
from test_tensor_parallel import _reference as tp_reference
from test_tensor_parallel import _rounds as tp_rounds
from tiny_v4 import (
    CSA,
    HCA,
    SLIDING,
    VOCAB,
    assert_logits_close,
    earliest_wins_topk,
    hf_from_scratch,
    save_tiny_v4,
    v4_config,
)
from transformers import DeepseekV4ForCausalLM

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.config import ModelConfig
from specray.actors.model.decoder import DecoderModel
from specray.actors.model.loader import load_model
from specray.actors.parallel.distributed import find_free_port

LENGTH = 64

# name -> (seed, config overrides). Every attention and MLP type, 1 to 3
# residual streams, sigmoid scoring, and an indexer that keeps everything.
VARIANTS: dict[str, tuple[int, dict[str, Any]]] = {
    "default": (0, {}),
    "one-stream": (2, {"hc_mult": 1}),
    "three-streams": (
        3,
        {
            "hc_mult": 3,
            "layer_types": [CSA, HCA, SLIDING],
            "mlp_layer_types": ["moe", "hash_moe", "moe"],
            "num_hidden_layers": 3,
            "scoring_func": "sigmoid",
        },
    ),
    "keep-all": (4, {"index_topk": 64, "layer_types": [HCA, CSA, SLIDING, CSA]}),
}


# Tiny V4 forwards are many small ops: one thread spares OpenMP's spinning.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def v4_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    made: dict[str, Path] = {}

    def make(variant: str) -> Path:
        if variant not in made:
            seed, overrides = VARIANTS[variant]
            made[variant] = save_tiny_v4(tmp_path_factory.mktemp(variant), seed, **overrides)
        return made[variant]

    return make


def _tokens(seed: int, count: int = LENGTH) -> list[int]:
    return torch.randint(3, VOCAB, (count,), generator=torch.Generator().manual_seed(seed)).tolist()


def _hf(model_dir: Path) -> DeepseekV4ForCausalLM:
    return DeepseekV4ForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def _prefill(model: DecoderModel, ids: list[int]) -> torch.Tensor:
    cache = model.new_cache(1, len(ids))
    slot = cache.allocate()
    return model(ForwardBatch.build([SequenceInput(slot, ids, 0, len(ids))]), cache).logits


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_path_equals_the_from_scratch_reference(
    v4_dir: Callable[[str], Path], variant: str
) -> None:
    model_dir = v4_dir(variant)
    ids = _tokens(VARIANTS[variant][0] + 10)
    hf = _hf(model_dir)
    reference = hf_from_scratch(hf, ids)
    model = load_model(model_dir)

    # Prefill of the whole sequence, every position's logits.
    prefill = _prefill(model, ids)
    assert_logits_close(prefill, reference)

    # Decode and multi-token verify chunks of 1..6 tokens after a prefill.
    rng = random.Random(VARIANTS[variant][0])
    cache = model.new_cache(1, LENGTH)
    slot = cache.allocate()
    rows = [model(ForwardBatch.build([SequenceInput(slot, ids[:7], 0, 7)]), cache).logits]
    position = 7
    while position < LENGTH:
        chunk = ids[position : position + rng.randint(1, 6)]
        seq = SequenceInput(slot, chunk, position, len(chunk))
        rows.append(model(ForwardBatch.build([seq]), cache).logits)
        position += len(chunk)
    assert_logits_close(torch.cat(rows), reference)

    # transformers' own multi-token forward is the same thing once top-k
    # ties are broken by index.
    with torch.no_grad(), earliest_wins_topk():
        hf_full = hf(torch.tensor([ids])).logits[0]
    assert_logits_close(prefill, hf_full)


def test_transformers_is_exact_where_the_indexer_keeps_everything(
    v4_dir: Callable[[str], Path],
) -> None:
    """With index_topk >= the number of entries, selection has no ties to
    break: transformers' unpatched multi-token forward then equals ours."""
    model_dir = v4_dir("keep-all")
    ids = _tokens(5)
    with torch.no_grad():
        hf_full = _hf(model_dir)(torch.tensor([ids])).logits[0]
    assert_logits_close(_prefill(load_model(model_dir), ids), hf_full)


def test_transformers_top_k_ties_alone_break_its_causality(
    v4_dir: Callable[[str], Path],
) -> None:
    """Unpatched, transformers' logits at a position change when later
    tokens join the forward (CSA only); with ties broken by index they do
    not. This is the finding the indexer's tie rule rests on."""
    hf = _hf(v4_dir("default"))
    ids = torch.tensor([_tokens(11)])
    with torch.no_grad():
        drift = (hf(ids).logits[0, :40] - hf(ids[:, :40]).logits[0]).abs().max().item()
        with earliest_wins_topk():
            fixed = (hf(ids).logits[0, :40] - hf(ids[:, :40]).logits[0]).abs().max().item()
    assert drift > 1e-3
    assert fixed < 1e-5


def test_mixed_batch_of_prefills_decodes_and_verifies(v4_dir: Callable[[str], Path]) -> None:
    """Sequences at different positions and lengths in one forward, in
    non-contiguous slots, each equal to its own reference."""
    model_dir = v4_dir("default")
    model = load_model(model_dir)
    hf = _hf(model_dir)
    sequences = [_tokens(20 + i, n) for i, n in enumerate((40, 23, 12, 33))]
    references = [hf_from_scratch(hf, ids) for ids in sequences]
    cache = model.new_cache(6, LENGTH)
    cache.allocate()  # leave a gap so the batch reads non-contiguous slots
    slots = [cache.allocate() for _ in sequences]
    # Per forward, each sequence's fed range [a, b), or None to sit it out:
    # prefills of different lengths, then one-token decodes, multi-token
    # verifies and a long feed side by side.
    steps = [
        [(0, 17), (0, 4), (0, 9), (0, 30)],
        [(17, 18), (4, 11), None, (30, 31)],
        [(18, 40), (11, 12), (9, 10), (31, 33)],
    ]
    for step in steps:
        live = [i for i, cut in enumerate(step) if cut is not None]
        seqs = []
        for i in live:
            a, b = step[i]  # type: ignore[misc]
            seqs.append(SequenceInput(slots[i], sequences[i][a:b], a, b - a))
        out = model(ForwardBatch.build(seqs), cache)
        for i, got in zip(live, out.split([s.num_logits for s in seqs]), strict=True):
            a, b = step[i]  # type: ignore[misc]
            assert_logits_close(got, references[i][a:b])


@pytest.mark.slow
def test_two_tensor_parallel_ranks_match_one(v4_dir: Callable[[str], Path], tmp_path: Path) -> None:
    """Query heads, sinks, output groups and every expert's columns split
    over two gloo ranks (compressors and indexer replicated) give one rank's
    logits and hidden states through prefill, verify and rollback."""
    model_dir = v4_dir("default")
    port = find_free_port()
    mp.spawn(tp_rank_main, args=(2, port, str(model_dir), str(tmp_path)), nprocs=2)
    sharded = torch.load(tmp_path / "outputs.pt", weights_only=False)
    assert_same_outputs(sharded, tp_rounds(tp_reference(model_dir)))


def test_hidden_states_are_the_residual_streams(v4_dir: Callable[[str], Path]) -> None:
    model_dir = v4_dir("default")
    ids = _tokens(7, 20)
    with torch.no_grad(), earliest_wins_topk():
        ref = _hf(model_dir)(torch.tensor([ids]), output_hidden_states=True).hidden_states
    model = load_model(model_dir)
    cache = model.new_cache(1, 32)
    slot = cache.allocate()
    out = model(ForwardBatch.build([SequenceInput(slot, ids, 0, 20)]), cache, (0, 2))
    assert out.hidden_states is not None
    width = out.hidden_states.shape[1] // 2
    # transformers' hidden_states[i + 1] is layer i's output streams,
    # [batch, seq, streams, hidden], but for the last layer's (the final norm's output).
    torch.testing.assert_close(out.hidden_states[:, :width], ref[1][0].flatten(1))
    torch.testing.assert_close(out.hidden_states[:, width:], ref[3][0].flatten(1))


def test_bfloat16_close_to_float32(tmp_path: Path) -> None:
    """bf16 rounding alone moves the logits by about 1 % of their range.
    The indexer's top-k and the router's expert choice are discrete: a near
    tie that bf16 flips moves a tiny random model's logits by 10 % or more
    (seen on an AVX512-BF16 machine, whose native bf16 kernels round unlike
    AVX2's), so here every compressed entry and every expert is selected and
    what is compared is the continuous math."""
    config = v4_config()
    model_dir = save_tiny_v4(
        tmp_path, 0, index_topk=64, num_experts_per_tok=config.n_routed_experts
    )
    ids = _tokens(8, 24)
    fp32 = _prefill(load_model(model_dir), ids)
    bf16 = _prefill(load_model(model_dir, "bfloat16"), ids)
    assert bf16.dtype == torch.float32
    assert (bf16 - fp32).abs().max().item() < 0.03 * fp32.abs().max().item()


def test_legacy_config_keys_read_as_the_current_ones() -> None:
    """DeepSeek's releases name a few things differently from
    transformers' save_pretrained; both give the same architecture."""
    current = v4_config().to_dict()
    legacy = {
        k: v
        for k, v in current.items()
        if k not in ("layer_types", "mlp_layer_types", "compress_rates", "partial_rotary_factor")
    }
    legacy.update(
        compress_ratios=[0, 4, 128, 4, 0],  # 4 layers, then the MTP block
        compress_rate_hca=8,
        num_hash_layers=1,
        qk_rope_head_dim=8,
        rope_scaling={"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 64},
        rope_parameters=None,
    )
    ours, theirs = ModelConfig.from_hf(current), ModelConfig.from_hf(legacy)
    assert ours == theirs
    assert ours.attention_types == (SLIDING, CSA, HCA, CSA)
    assert ours.mlp_types == ("hash_moe", "moe", "moe", "moe")
    assert ours.mtp_attention_types == (SLIDING,)
    params = ours.compressed_attention
    assert params is not None and params.compress_rope.yarn is not None
    assert (params.csa_rate, params.hca_rate, params.compress_rope.dim) == (4, 8, 8)
