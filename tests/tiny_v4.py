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
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.decoder import DecoderModel
from specray.actors.store.tiny_v4 import CSA as CSA  # re-exported for the V4 tests
from specray.actors.store.tiny_v4 import HCA as HCA
from specray.actors.store.tiny_v4 import SLIDING, randomize_routing, tiny_v4_config

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
        save_file(_mtp_tensors(config, seed + 1000), str(directory / "mtp.safetensors"))
    return directory


# What the MTP block shares with the target's own blocks.
_MTP_SHARED_FIELDS = (
    "hidden_size",
    "hc_mult",
    "vocab_size",
    "n_routed_experts",
    "num_experts_per_tok",
    "moe_intermediate_size",
)


def _mtp_tensors(config: DeepseekV4Config, seed: int) -> dict[str, torch.Tensor]:
    """A one-layer V4 block (sliding attention, learned routing) plus the
    MTP block's own projections, norms and hyper head."""
    block_config = v4_config(
        **{
            **{k: getattr(config, k) for k in _MTP_SHARED_FIELDS},
            "num_hidden_layers": 1,
            "layer_types": [SLIDING],
            "mlp_layer_types": ["moe"],
        }
    )
    with torch.no_grad(), contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(_tempdir()))
        random_v4(block_config, seed).save_pretrained(scratch)
        saved = load_file(str(scratch / "model.safetensors"))
    prefix = "model.layers.0."
    tensors = {f"mtp.0.{k[len(prefix) :]}": v for k, v in saved.items() if k.startswith(prefix)}
    gen = torch.Generator().manual_seed(seed)
    hidden, streams = config.hidden_size, config.hc_mult
    for name in ("e_proj", "h_proj"):
        tensors[f"mtp.0.{name}.weight"] = torch.randn(hidden, hidden, generator=gen) * 0.05
    for name in ("enorm", "hnorm", "norm"):
        tensors[f"mtp.0.{name}.weight"] = 1 + 0.2 * torch.randn(hidden, generator=gen)
    tensors["mtp.0.hc_head_fn"] = torch.randn(streams, streams * hidden, generator=gen) * 0.02
    tensors["mtp.0.hc_head_base"] = 0.2 * torch.randn(streams, generator=gen)
    tensors["mtp.0.hc_head_scale"] = 1 + 0.2 * torch.randn(1, generator=gen)
    return tensors


@contextlib.contextmanager
def _tempdir() -> Iterator[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as path:
        yield path


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
