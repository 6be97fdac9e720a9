"""A tiny random DeepSeek-V4 checkpoint, for trying the V4 serving path.

``write_tiny_v4`` saves what a served V4 needs and nothing real: transformers'
``DeepseekV4ForCausalLM`` with random weights (every attention type, hash and
learned routing, enough routed experts to split over expert-parallel ranks),
a multi-token-prediction block under DeepSeek's ``mtp.0.*`` names (which
transformers neither builds nor saves) so the ``mtp`` drafter has weights,
and a byte-level BPE tokenizer with a chat template trained here on a few
lines of text. Its output is random text; the path it exercises is real.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import DeepseekV4Config, DeepseekV4ForCausalLM

from specray.actors.store.chat_tokenizer import save_chat_tokenizer

SLIDING, CSA, HCA = (
    "sliding_attention",
    "compressed_sparse_attention",
    "heavily_compressed_attention",
)
CORPUS = (
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i)\n",
    "The quick brown fox jumps over the lazy dog.",
    "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2, 3]\n",
    "Speculative decoding drafts tokens and the target verifies them.",
)
VOCAB = 512  # past the tokenizer's ids, as real checkpoints pad their vocabulary


def tiny_v4_config(experts: int = 8, eos_token_id: int = 1, **overrides: Any) -> DeepseekV4Config:
    """Four layers (sliding, CSA, HCA, CSA; the first hash-routed), hidden 64,
    ``experts`` routed experts of which 2 per token, 2 residual streams."""
    params: dict[str, Any] = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        moe_intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        head_dim=32,
        q_lora_rank=48,
        partial_rotary_factor=0.25,
        num_experts_per_tok=2,
        n_routed_experts=experts,
        layer_types=[SLIDING, CSA, HCA, CSA],
        mlp_layer_types=["hash_moe", "moe", "moe", "moe"],
        compress_rates={CSA: 4, HCA: 8},
        hc_mult=2,
        sliding_window=8,
        o_groups=2,
        o_lora_rank=16,
        index_n_heads=2,
        index_head_dim=16,
        index_topk=4,
        max_position_embeddings=4096,
        # Wider than the default 0.02, so greedy output varies with the context.
        initializer_range=0.1,
        eos_token_id=eos_token_id,
        bos_token_id=eos_token_id,
    )
    params.update(overrides)
    return DeepseekV4Config(**params)


def write_tiny_v4(directory: str | Path, seed: int = 0, experts: int = 8, **overrides: Any) -> Path:
    """Save a servable tiny random V4 (weights, MTP block, tokenizer) to
    ``directory``; ``overrides`` replace :func:`tiny_v4_config`'s fields."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    eos = save_chat_tokenizer(directory, CORPUS)
    config = tiny_v4_config(experts, eos, **overrides)
    _random_model(config, seed).save_pretrained(directory)
    save_file(mtp_tensors(config, seed + 1), str(directory / "mtp.safetensors"))
    return directory


def _random_model(config: DeepseekV4Config, seed: int) -> DeepseekV4ForCausalLM:
    """transformers' init, plus random hash-routing tables (its init leaves
    every token on expert 0) and selection biases."""
    torch.manual_seed(seed)
    model = DeepseekV4ForCausalLM(config).float().eval()
    randomize_routing(model, config.n_routed_experts)
    return model


@torch.no_grad()
def randomize_routing(model: torch.nn.Module, experts: int) -> None:
    """Random hash-routing tables and expert selection biases, from torch's
    current seed: transformers' init routes every token to expert 0."""
    for module in model.modules():
        table = getattr(module, "tid2eid", None)
        if isinstance(table, torch.Tensor):
            table.copy_(torch.randint(0, experts, table.shape))
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.normal_(0, 0.1)


def mtp_tensors(
    config: DeepseekV4Config,
    seed: int,
    build: Callable[[DeepseekV4Config, int], DeepseekV4ForCausalLM] | None = None,
    spread: float = 0.0,
    proj_scale: float = 0.1,
) -> dict[str, torch.Tensor]:
    """One V4 block (sliding attention, learned routing) as ``mtp.0.*``, plus
    the MTP block's own projections, norms and hyper head. ``build`` makes
    the random block (default: transformers' init with random routing);
    ``spread`` is the noise on the MTP norms and hyper head (0: norms at 1,
    base 0, scale 1); ``proj_scale`` the std of its two input projections."""
    block = config.to_dict() | {
        "num_hidden_layers": 1,
        "layer_types": [SLIDING],
        "mlp_layer_types": ["moe"],
    }
    with tempfile.TemporaryDirectory() as scratch:
        (build or _random_model)(DeepseekV4Config(**block), seed).save_pretrained(scratch)
        saved = load_file(str(Path(scratch) / "model.safetensors"))
    prefix = "model.layers.0."
    tensors = {f"mtp.0.{k[len(prefix) :]}": v for k, v in saved.items() if k.startswith(prefix)}
    gen = torch.Generator().manual_seed(seed)
    hidden, streams = config.hidden_size, config.hc_mult
    for name in ("e_proj", "h_proj"):
        tensors[f"mtp.0.{name}.weight"] = torch.randn(hidden, hidden, generator=gen) * proj_scale
    for name in ("enorm", "hnorm", "norm"):
        tensors[f"mtp.0.{name}.weight"] = 1 + spread * torch.randn(hidden, generator=gen)
    tensors["mtp.0.hc_head_fn"] = torch.randn(streams, streams * hidden, generator=gen) * 0.02
    tensors["mtp.0.hc_head_base"] = spread * torch.randn(streams, generator=gen)
    tensors["mtp.0.hc_head_scale"] = 1 + spread * torch.randn(1, generator=gen)
    return tensors
