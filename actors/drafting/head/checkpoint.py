"""Save and load a draft head: its own weights in safetensors, the rest
borrowed from the target's checkpoint at load time (never duplicated)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from specray.actors.drafting.head.config import WEIGHTS_NAME, HeadConfig
from specray.actors.drafting.head.model import DraftHead, FrozenParts
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import parse_dtype
from specray.actors.parallel.weights import WeightSource
from specray.actors.store.errors import NotCachedError
from specray.actors.store.resolve import resolve_model

# Families whose decoder layer is exactly the head's (pre-norm, no QK-norm,
# Llama-flavour RMSNorm): a head for them can start from the target's last layer.
_LAYER_COMPATIBLE = ("qwen2", "llama")


def load_frozen(
    target_dir: Path, draft_vocab: torch.Tensor, dtype: torch.dtype = torch.float32
) -> FrozenParts:
    """The target's embedding, the LM-head rows of ``draft_vocab`` and its final norm."""
    with WeightSource(target_dir) as source:
        embed = source.read("model.embed_tokens.weight").to(dtype)
        if "lm_head.weight" in source:
            lm_head = source.read("lm_head.weight").index_select(0, draft_vocab).to(dtype)
        else:  # tied
            lm_head = embed.index_select(0, draft_vocab).clone()
        norm = source.read("model.norm.weight").float() if "model.norm.weight" in source else None
    return FrozenParts(embed, lm_head, norm)


def init_from_target(head: DraftHead, target_dir: Path, target: ModelConfig) -> list[str]:
    """Start the head near the target: fc passes the top hidden state through,
    the token projection is the identity, and (where the family's layer is the
    head's) the layer and output norm are copies of the target's last ones.

    Returns the names that were copied from the target, for the log.
    """
    copied: list[str] = []
    hidden = head.config.hidden_size
    with torch.no_grad():
        head.fc.weight.zero_()
        head.fc.weight[:, -hidden:] = torch.eye(hidden)
        head.token_proj.weight.copy_(torch.eye(hidden))
        if target.model_type not in _LAYER_COMPATIBLE or (
            head.config.intermediate_size != target.intermediate_size
        ):
            return copied
        prefix = f"model.layers.{target.num_layers - 1}"
        with WeightSource(target_dir) as source:
            for name, param in head.layer.named_parameters():
                key = f"{prefix}.{name}"
                if key in source and tuple(source.shape(key)) == tuple(param.shape):
                    param.copy_(source.read(key).float())
                    copied.append(key)
            if "model.norm.weight" in source:
                head.norm.weight.copy_(source.read("model.norm.weight").float())
                copied.append("model.norm.weight")
    return copied


def save_head(head: DraftHead, directory: Path) -> Path:
    """``config.json`` and ``head.safetensors`` (trained weights and the draft vocabulary)."""
    directory = Path(directory)
    head.config.save(directory)
    tensors = {k: v.detach().contiguous().cpu() for k, v in head.state_dict().items()}
    save_file(tensors, str(directory / WEIGHTS_NAME))
    return directory


def load_head(
    directory: Path,
    target_dir: Path,
    dtype: str | torch.dtype = torch.float32,
    target: ModelConfig | None = None,
) -> DraftHead:
    """A head ready to draft for the target at ``target_dir``."""
    directory = Path(directory)
    config = HeadConfig.load(directory)
    config.check_target(target or ModelConfig.from_pretrained(target_dir))
    weights = load_file(str(directory / WEIGHTS_NAME))
    draft_vocab = weights["draft_vocab"]
    torch_dtype = parse_dtype(dtype)
    head = DraftHead(config, draft_vocab, load_frozen(target_dir, draft_vocab, torch_dtype))
    head.load_state_dict(weights)
    return head.to(torch_dtype).eval().requires_grad_(False)


def resolve_head_target(directory: Path, dtype: str = "bfloat16", home: Path | None = None) -> Path:
    """The checkpoint of the target a head was trained for (the store's copy
    in ``dtype`` when cached, else its default one), never fetched here."""
    target = HeadConfig.load(directory).target
    try:
        return resolve_model(target, home=home, fetch_missing=False, dtype=dtype)
    except NotCachedError:
        return resolve_model(target, home=home, fetch_missing=False)
