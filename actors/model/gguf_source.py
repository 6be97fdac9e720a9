"""Read a model's tensors, or a rank's slice of them, straight from a GGUF file.

Tensors are asked for by their Hugging Face names (what the model code
uses); ``gguf``'s own name map for the file's architecture finds them in the
file. Quantized tensors are handed out as codes with their scales
(:meth:`GGUFWeightSource.read_quantized`), so a layer can keep them in a
low-bit format; everything else, and any block type without a decoder here,
is read dense as float32 through ``gguf``'s reference dequantizer.

The file is memory-mapped: a rank touches only the bytes of its rows, or of
the blocks that hold its columns.

Two conversions that llama.cpp's converter applies are undone here, as
transformers' GGUF loader undoes them: Llama's q/k rows are permuted per
head (for its rotary layout), and Gemma's norm weights are stored as
``1 + w``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, MODEL_ARCH_NAMES, GGMLQuantizationType, get_tensor_name_map
from gguf.quants import dequantize as gguf_dequantize

from specray.actors.model.config import ModelConfig
from specray.actors.model.gguf_index import GGUFIndex, TensorInfo
from specray.actors.parallel.gguf_blocks import DECODERS, decode_blocks
from specray.actors.parallel.quantized import GroupAffine
from specray.actors.parallel.span import Span
from specray.actors.parallel.weights import MissingWeightError, WeightSource

# Read with numpy as they are; other types go through a dequantizer.
PLAIN_FLOAT_TYPES = {GGMLQuantizationType.F32, GGMLQuantizationType.F16}
# Our model types whose gguf architecture name differs.
ARCH_NAMES = {"gemma3_text": "gemma3"}
Rows = TypeVar("Rows", torch.Tensor, GroupAffine)


class GGUFWeightSource(WeightSource):
    """The tensors of one GGUF file, under Hugging Face names."""

    def __init__(self, gguf_path: str | Path, config: ModelConfig) -> None:
        # Not a safetensors directory: the base class's reading is replaced
        # as a whole, its interface kept.
        self.path = Path(gguf_path)
        self.config = config
        self._index = GGUFIndex(self.path)
        arch = self._index.architecture
        expected = ARCH_NAMES.get(config.model_type, config.model_type)
        if arch != expected:
            raise ValueError(f"{self.path.name} is a {arch!r} model, the config a {expected!r}")
        arch_id = next(key for key, name in MODEL_ARCH_NAMES.items() if name == arch)
        self._names = get_tensor_name_map(arch_id, config.num_layers)
        self._tensors = dict(self._index.tensors)

    def close(self) -> None:
        self._tensors.clear()

    def __contains__(self, name: str) -> bool:
        return self.gguf_name(name) in self._tensors

    def names(self) -> Iterator[str]:
        """The file's own (GGUF) tensor names."""
        return iter(self._tensors)

    def shape(self, name: str) -> list[int]:
        return list(self._tensor(name).shape)

    def quant_type(self, name: str) -> GGMLQuantizationType:
        return self._tensor(name).qtype

    def read(self, name: str, span: Span | None = None) -> torch.Tensor:
        """Float32, dequantized where the file holds it quantized."""
        quantized = self.read_quantized(name, span)
        if quantized is not None:
            return quantized.dequantize()
        tensor = self._tensor(name)
        qtype = tensor.qtype
        rows = self._rows(tensor, span)
        if qtype in PLAIN_FLOAT_TYPES:
            values = torch.from_numpy(np.array(rows, dtype=np.float32))
        else:
            values = torch.from_numpy(gguf_dequantize(np.asarray(rows), qtype).copy())
        if span is not None and span.dim == 1:
            values = values[:, span.start : span.end]
        if self.config.gemma_norms and name.endswith("norm.weight"):
            values = values - 1
        return self._unpermute(name, span, values)

    def read_quantized(self, name: str, span: Span | None = None) -> GroupAffine | None:
        """The slice as codes and scales; None for dense tensors and block
        types without a decoder (``read`` dequantizes those)."""
        tensor = self._tensor(name)
        qtype = tensor.qtype
        if qtype not in DECODERS or len(tensor.shape) != 2:
            return None
        if span is not None and span.dim == 1:
            block_size, type_size = GGML_QUANT_SIZES[qtype]
            cols = tensor.shape[1]
            first, last = span.blocks(block_size, cols)
            raw = self._index.data(tensor)[:, first * type_size : last * type_size]
            matrix = decode_blocks(torch.from_numpy(np.array(raw)), qtype)
            matrix = matrix.narrow(1, span.start - first * block_size, span.stop(cols) - span.start)
        else:
            matrix = decode_blocks(torch.from_numpy(np.array(self._rows(tensor, span))), qtype)
        return self._unpermute(name, span, matrix)

    def _rows(self, tensor: TensorInfo, span: Span | None) -> np.ndarray:
        data = self._index.data(tensor)
        return data[span.start : span.end] if span is not None and span.dim == 0 else data

    def _unpermute(self, name: str, span: Span | None, values: Rows) -> Rows:
        """Llama's q/k rows back in Hugging Face order (a per-head permutation)."""
        if self.config.model_type != "llama" or not name.endswith(
            ("q_proj.weight", "k_proj.weight")
        ):
            return values
        head_dim = self.config.head_dim
        rows = values.shape[0]
        if span is not None and span.dim == 0 and span.start % head_dim:
            raise ValueError(f"rows of {name} must be read by whole heads")
        # Stored per head as [2, head_dim / 2] pairs; Hugging Face keeps halves.
        order = torch.arange(rows).view(rows // head_dim, head_dim // 2, 2).transpose(1, 2)
        index = order.reshape(-1)
        if isinstance(values, GroupAffine):
            return values.index_rows(index)
        return values.index_select(0, index)

    def gguf_name(self, name: str) -> str | None:
        """The file's name for Hugging Face tensor ``name`` (None if unmapped)."""
        base, _, suffix = name.rpartition(".")
        mapped = self._names.get_name(base)
        return None if mapped is None else f"{mapped}.{suffix}"

    def _tensor(self, name: str) -> TensorInfo:
        gguf_name = self.gguf_name(name)
        if gguf_name is None or gguf_name not in self._tensors:
            raise MissingWeightError(f"{self.path.name} has no tensor for {name!r}")
        return self._tensors[gguf_name]


FOUR_BIT_TYPES = {GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K}


def int4_share(gguf_path: str | Path) -> float:
    """Fraction of the matmul parameters (2-D tensors other than the token
    embedding, which is looked up, not multiplied) in 4-bit blocks: what runs
    on the int4 kernel when the file is loaded with ``weights="gguf"``."""
    four_bit = total = 0
    for tensor in GGUFIndex(gguf_path).tensors.values():
        if len(tensor.shape) != 2 or tensor.name.startswith("token_embd"):
            continue
        total += tensor.num_elements
        if tensor.qtype in FOUR_BIT_TYPES:
            four_bit += tensor.num_elements
    return four_bit / total if total else 0.0
