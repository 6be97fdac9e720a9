"""GGUF file -> Hugging Face directory (config, safetensors weights, tokenizer)."""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from importlib.metadata import version
from pathlib import Path
from typing import Any

from specray.actors.store.errors import ConversionError

SHARD_SIZE = "2GB"  # bounds the bytes save_pretrained holds per file, and keeps files mmap-friendly


@contextlib.contextmanager
def _quiet(enabled: bool) -> Iterator[None]:
    """Swallow transformers' own progress bars when the caller asked for silence."""
    if enabled:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    else:
        yield


def _strip_quantization(model: Any) -> None:
    """A dequantized model must not be saved as if it were still GGUF-quantized."""
    if getattr(model.config, "quantization_config", None) is not None:
        model.config.quantization_config = None
    if hasattr(model, "hf_quantizer"):
        del model.hf_quantizer


def converter_versions() -> dict[str, str]:
    return {lib: version(lib) for lib in ("transformers", "torch", "gguf", "safetensors")}


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str, progress: bool) -> None:
    """Dequantize ``gguf_path`` into ``out_dir`` as a safetensors checkpoint in ``dtype``.

    ``from_pretrained(gguf_file=...)`` insists on ``accelerate`` only to reach the
    same legacy loader used here: transformers' ``load_gguf_checkpoint`` dequantizes
    tensor by tensor (cast to ``dtype`` as it goes), then the standard loader adopts
    those tensors without copying them, so the peak is about one copy of the weights.
    """
    # Imported here so that listing or resolving cached models never pays for them.
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    directory, filename = str(gguf_path.parent), gguf_path.name
    try:
        with _quiet(not progress):
            config = AutoConfig.from_pretrained(directory, gguf_file=filename)
            with torch.device("meta"):
                skeleton = AutoModelForCausalLM.from_config(config)
            tensors = load_gguf_checkpoint(
                str(gguf_path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch_dtype
            )["tensors"]
            model_class = type(skeleton)
            del skeleton
            model, info = model_class.from_pretrained(
                None, config=config, state_dict=tensors, dtype=torch_dtype, output_loading_info=True
            )
            del tensors
            tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    except Exception as error:
        raise ConversionError(f"could not convert {filename}: {error}") from error
    problems = {kind: keys for kind, keys in info.items() if keys and kind != "error_msgs"}
    if problems:
        raise ConversionError(f"{filename} does not fill the model's weights: {problems}")
    _strip_quantization(model)
    model.save_pretrained(out_dir, max_shard_size=SHARD_SIZE)
    model.generation_config.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
