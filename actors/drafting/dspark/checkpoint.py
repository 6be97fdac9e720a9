"""DSpark checkpoints in DeepSpec's format: load, save, and name on the CLI.

DeepSpec saves a drafter with Hugging Face's ``save_pretrained``: a
``config.json`` (see :mod:`.config`) and ``model.safetensors`` (or shards
with an index) holding ``embed_tokens``, ``fc``, ``hidden_norm``,
``layers.{i}.self_attn.{q,k,v,o}_proj``, ``q_norm``/``k_norm``,
``layers.{i}.mlp.{gate,up,down}_proj``, the layer norms, ``norm``,
``lm_head``, ``markov_head.markov_w{1,2}`` and ``confidence_head.proj``.
Only safetensors are read. Our own addition, ``calibration.json`` (per
position confidence temperatures), sits next to them and is optional.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from specray.actors.drafting.drafter_config import CONFIG_NAME
from specray.actors.drafting.dspark.calibration import Calibration
from specray.actors.drafting.dspark.config import DSparkConfig
from specray.actors.drafting.dspark.model import DSparkModel
from specray.actors.model.config import ModelConfig
from specray.actors.model.loader import parse_dtype
from specray.actors.parallel.group import TPGroup
from specray.actors.parallel.weights import WeightSource

WEIGHTS_NAME = "model.safetensors"


def load_dspark(
    directory: str | Path,
    dtype: str | torch.dtype = torch.float32,
    group: TPGroup | None = None,
    target_dir: str | Path | None = None,
) -> DSparkModel:
    """A DSpark drafter from a DeepSpec-format directory, or from a
    DeepSeek-V4 checkpoint that carries one under ``mtp.*``.

    ``target_dir``, when given, is checked against the drafter's config, and
    lends its embedding and LM head if the drafter's checkpoint has none.
    """
    directory = Path(directory)
    config = DSparkConfig.load(directory)
    if target_dir is not None:
        config.check_target(ModelConfig.from_pretrained(target_dir))
    model = DSparkModel(config, parse_dtype(dtype), group)
    aliases = config.decoder.weight_aliases
    with WeightSource(directory, aliases) as source:
        if target_dir is None:
            model.load(source)
        else:
            with WeightSource(target_dir, aliases) as borrowed:
                model.load(source, borrowed)
    return model.eval()


def load_calibration(directory: str | Path, config: DSparkConfig) -> Calibration:
    return Calibration.load(Path(directory), config.block_size)


def deepspec_state_dict(model: DSparkModel) -> dict[str, torch.Tensor]:
    """The model's weights under DeepSpec's names (unsharded models only):
    fused projections are split back into their checkpoint tensors."""
    d = model.config.decoder
    if model.embed_tokens.group.size != 1:
        raise ValueError("save a DSpark model built without tensor parallelism")
    q, kv, inter = d.q_size, d.kv_size, d.intermediate_size
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        # Parallel layers hold their matrix in a ``weights`` module.
        name = name.replace(".weights.weight", ".weight")
        if ".layer." in name:
            name = name.replace(".layer.", ".")
        if name.endswith("qkv_proj.weight") or name.endswith("qkv_proj.bias"):
            base, kind = name.rsplit(".qkv_proj.", 1)
            for part, piece in zip(("q", "k", "v"), tensor.split([q, kv, kv]), strict=True):
                state[f"{base}.{part}_proj.{kind}"] = piece.clone()
        elif name.endswith("gate_up_proj.weight"):
            base = name.rsplit(".gate_up_proj.", 1)[0]
            gate, up = tensor.split([inter, inter])
            state[f"{base}.gate_proj.weight"], state[f"{base}.up_proj.weight"] = gate, up
        elif name.startswith("markov_head."):
            state[f"{name}.weight"] = tensor
        elif name.startswith("confidence_head."):
            state[f"confidence_head.proj.{name.rsplit('.', 1)[1]}"] = tensor
        else:
            state[name] = tensor
    state["embed_tokens.weight"] = state["embed_tokens.weight"][: d.vocab_size].clone()
    state["lm_head.weight"] = state["lm_head.weight"][: d.vocab_size].clone()
    return state


def save_dspark(
    model: DSparkModel,
    directory: str | Path,
    hf_config: dict[str, Any],
    calibration: Calibration | None = None,
) -> Path:
    """Write ``directory`` in DeepSpec's format (``hf_config`` from
    :func:`.config.dspark_hf_config`), plus ``calibration.json`` if given."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if DSparkConfig.from_hf(hf_config) != model.config:
        raise ValueError("hf_config does not describe this model")
    (directory / CONFIG_NAME).write_text(json.dumps(hf_config, indent=2) + "\n")
    save_file(deepspec_state_dict(model), str(directory / WEIGHTS_NAME), {"format": "pt"})
    if calibration is not None:
        calibration.save(directory)
    return directory
