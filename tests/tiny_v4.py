"""Tiny random DeepSeek-V4 checkpoints, saved the way transformers saves them,
plus the from-scratch reference every V4 path is tested against.

The configs keep every block small enough to run in milliseconds while still
exercising it: a sliding window of 6, CSA every 4 tokens with an indexer
that keeps 3 entries (so a 64-token sequence has 16 entries to choose from),
HCA every 8 tokens, hash and learned routing, 2 or more residual streams.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.store.tiny_v4 import CSA as CSA  # re-exported for the V4 tests
from specray.actors.store.tiny_v4 import HCA as HCA
from specray.actors.store.tiny_v4 import SLIDING as SLIDING
from specray.actors.store.tiny_v4 import mtp_tensors, randomize_routing, tiny_v4_config

VOCAB = 160


def v4_config(**overrides: Any) -> DeepseekV4Config:
    """The shipped tiny V4's blocks with a smaller vocabulary, window and
    indexer, YaRN on the compressed branches, and transformers' default
    initialisation (random_v4 perturbs what it leaves at 0 or 1)."""
    params: dict[str, Any] = dict(
        vocab_size=VOCAB,
        n_routed_experts=6,
        sliding_window=6,
        index_topk=3,
        max_position_embeddings=512,
        rope_parameters={
            "rope_type": "yarn",
            "factor": 8.0,
            "original_max_position_embeddings": 64,
        },
        initializer_range=DeepseekV4Config().initializer_range,
        eos_token_id=1,
        bos_token_id=2,
    )
    params.update(overrides)
    return tiny_v4_config(**params)


def random_v4(config: DeepseekV4Config, seed: int) -> DeepseekV4ForCausalLM:
    """transformers' init leaves norms at 1 and sinks, biases, position
    biases and routing tables at 0; perturb them so a test notices any of
    them applied the wrong way."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).float().eval()
    nudged = ("norm", "sinks", "position_bias", "base", "scale")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in nudged):
                param.add_(torch.randn_like(param) * 0.2)
    randomize_routing(model, config.n_routed_experts)
    return model


def save_tiny_v4(directory: Path, seed: int = 0, mtp: bool = False, **overrides: Any) -> Path:
    """Save a random V4 to ``directory``; with ``mtp``, also a random
    multi-token-prediction block under DeepSeek's ``mtp.0.*`` names (which
    transformers neither builds nor saves)."""
    config = v4_config(**overrides)
    random_v4(config, seed).save_pretrained(directory)
    if mtp:
        tensors = mtp_tensors(config, seed + 1000, random_v4, spread=0.2, proj_scale=0.05)
        save_file(tensors, str(directory / "mtp.safetensors"))
    return directory


def save_v4_draft(directory: Path, seed: int, **overrides: Any) -> Path:
    """Save a smaller random V4 with the target's vocabulary, to draft for it:
    two layers (HCA, then CSA) where :func:`v4_config` has four."""
    return save_tiny_v4(
        directory,
        seed=seed,
        num_hidden_layers=2,
        layer_types=[HCA, CSA],
        mlp_layer_types=["hash_moe", "moe"],
        **overrides,
    )


# -- the from-scratch reference ---------------------------------------------


def _stable_topk(
    x: torch.Tensor, k: int, dim: int = -1, largest: bool = True, sorted: bool = True
) -> Any:
    order = torch.sort(x, dim=dim, descending=largest, stable=True)
    values, indices = order.values.narrow(dim, 0, k), order.indices.narrow(dim, 0, k)
    return torch.return_types.topk((values, indices))


@contextlib.contextmanager
def earliest_wins_topk() -> Iterator[None]:
    """Make transformers' top-k break ties towards the lower index, the rule
    our indexer follows. Unpatched, torch's top-k leaves ties in an
    implementation-defined order, and the V4 indexer's scores tie exactly
    whenever ReLU zeroes every head: that alone is what makes transformers'
    multi-token CSA forward non-causal and its cached decode drift."""
    tensor_topk, function_topk = torch.Tensor.topk, torch.topk
    torch.Tensor.topk = _stable_topk  # type: ignore[method-assign,assignment]
    torch.topk = _stable_topk  # type: ignore[assignment]
    try:
        yield
    finally:
        torch.Tensor.topk = tensor_topk  # type: ignore[method-assign]
        torch.topk = function_topk


def hf_from_scratch(model: DeepseekV4ForCausalLM, token_ids: list[int]) -> torch.Tensor:
    """``[len, vocab]``: row ``t`` is transformers' last-position logits for
    tokens ``0..t`` alone (no cache), ties broken as :func:`earliest_wins_topk`."""
    ids = torch.tensor([token_ids])
    with torch.no_grad(), earliest_wins_topk():
        return torch.stack([model(ids[:, : t + 1]).logits[0, -1] for t in range(len(token_ids))])


def ours_from_scratch(model: DecoderModel, token_ids: list[int]) -> torch.Tensor:
    """The same definition on our model: a fresh cache per prefix."""
    rows = []
    for t in range(len(token_ids)):
        cache = model.new_cache(1, len(token_ids))
        slot = cache.allocate()
        rows.append(model(ForwardBatch.build([SequenceInput(slot, token_ids[: t + 1], 0)]), cache))
    return torch.cat([r.logits for r in rows])


def assert_logits_close(ours: torch.Tensor, ref: torch.Tensor, tolerance: float = 1e-4) -> None:
    """Within ``tolerance`` of the logit scale, and the same argmax."""
    scale = ref.abs().max().item()
    worst = (ours - ref).abs().max().item()
    assert worst <= tolerance * max(scale, 1e-3), f"max |diff| {worst:.3g}, logit scale {scale:.3g}"
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def save_v4_dspark(
    directory: Path,
    seed: int = 0,
    depth: int = 2,
    block_size: int = 4,
    target_layer_ids: tuple[int, ...] = (0, 1),
    markov_rank: int = 8,
    **overrides: Any,
) -> Path:
    """A random V4 target with a random DSpark drafter beside it under
    ``mtp.*``: ``depth`` sliding-window MoE layers (``mtp.{i}``, the V4
    layer's own names) plus the drafter's fc, norms, hyper head, Markov
    and confidence heads, and the DSpark fields in ``config.json``."""
    save_tiny_v4(directory, seed, **overrides)
    config = v4_config(**overrides)
    hidden, streams = config.hidden_size, config.hc_mult
    mtp_own = ("e_proj", "h_proj", "enorm", "hnorm", "norm")  # the MTP block's, not the layer's
    tensors: dict[str, torch.Tensor] = {}
    for i in range(depth):
        block = mtp_tensors(config, seed + 1000 + i, random_v4, spread=0.2)
        for name, tensor in block.items():
            short = name.removeprefix("mtp.0.")
            if short.split(".")[0] not in mtp_own and not short.startswith("hc_head_"):
                tensors[f"mtp.{i}.{short}"] = tensor
    gen = torch.Generator().manual_seed(seed + 2000)
    fused = len(target_layer_ids) * streams * hidden
    tensors["mtp.fc.weight"] = torch.randn(hidden, fused, generator=gen) * fused**-0.5
    for name in ("hidden_norm", "norm"):
        tensors[f"mtp.{name}.weight"] = 1 + 0.2 * torch.randn(hidden, generator=gen)
    tensors["mtp.hc_head_fn"] = torch.randn(streams, streams * hidden, generator=gen) * 0.02
    tensors["mtp.hc_head_base"] = 0.2 * torch.randn(streams, generator=gen)
    tensors["mtp.hc_head_scale"] = 1 + 0.2 * torch.randn(1, generator=gen)
    for name in ("markov_w1", "markov_w2"):
        tensors[f"mtp.markov_head.{name}.weight"] = 0.2 * torch.randn(
            config.vocab_size, markov_rank, generator=gen
        )
    tensors["mtp.confidence_head.proj.weight"] = 0.1 * torch.randn(
        1, hidden + markov_rank, generator=gen
    )
    tensors["mtp.confidence_head.proj.bias"] = torch.randn(1, generator=gen)
    save_file(tensors, str(directory / "dspark.safetensors"))
    hf = json.loads((directory / "config.json").read_text())
    hf.update(
        num_nextn_predict_layers=depth,
        block_size=block_size,
        mask_token_id=config.vocab_size - 1,
        target_layer_ids=list(target_layer_ids),
        markov_rank=markov_rank,
        markov_head_type="vanilla",
        enable_confidence_head=True,
        confidence_head_with_markov=True,
    )
    (directory / "config.json").write_text(json.dumps(hf, indent=2))
    return directory


def hf_greedy(target_dir: Path, prompt: list[int], count: int) -> list[int]:
    """transformers run from scratch on the whole prefix for every token."""
    hf = DeepseekV4ForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    tokens = list(prompt)
    with torch.no_grad(), earliest_wins_topk():
        for _ in range(count):
            tokens.append(int(hf(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens[len(prompt) :]
