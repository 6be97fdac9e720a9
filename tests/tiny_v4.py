"""Tiny random DeepSeek-V4 checkpoints, saved the way transformers saves them,
plus the from-scratch reference every V4 path is tested against.

The configs keep every block small enough to run in milliseconds while still
exercising it: a sliding window of 6, CSA every 4 tokens with an indexer
that keeps 3 entries (so a 64-token sequence has 16 entries to choose from),
HCA every 8 tokens, hash and learned routing, 2 or more residual streams.
"""

from __future__ import annotations

import contextlib
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
