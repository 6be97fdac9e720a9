"""GGUF quantization blocks decoded into codes, scales and offsets.

Each decoder takes a tensor's raw bytes (``[rows, blocks * type_size]``
uint8) and returns the :class:`GroupAffine` with the same values, computed
the way ``gguf.quants`` computes them (float32 products of the stored fp16
and integer fields, so dequantizing gives bit-identical results):

======  ============  =====  ==============  ==========================
type    codes         group  scale           offset
======  ============  =====  ==============  ==========================
Q4_0    q - 8         32     d               -
Q4_1    q (0..15)     32     d               m
Q5_0    q - 16        32     d               -
Q5_1    q (0..31)     32     d               m
Q8_0    q (int8)      32     d               -
Q4_K    q (0..15)     32     d * sc (6 bit)  -(dmin * m) (6 bit m)
Q5_K    q (0..31)     32     d * sc          -(dmin * m)
Q6_K    q - 32        16     d * sc (int8)   -
======  ============  =====  ==============  ==========================

``d``, ``m`` and ``dmin`` are fp16; ``d * sc`` has at most 11 + 8 significant
bits, so it is exact in float32 (and rounds in bfloat16).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from specray.actors.parallel.quantized import GroupAffine

QK_K = 256


def _fp16(raw: torch.Tensor, start: int) -> torch.Tensor:
    """[rows, blocks] float32 from the fp16 at byte ``start`` of every block."""
    return raw[..., start : start + 2].contiguous().view(torch.float16).squeeze(-1).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[..., n] bytes -> [..., 2, n]: low nibbles, then high nibbles."""
    return torch.stack([qs & 0x0F, qs >> 4], dim=-2)


def _bits(packed: torch.Tensor, count: int) -> torch.Tensor:
    """[..., n] bytes -> [..., count, n]: bit i of every byte."""
    shifts = torch.arange(count, dtype=torch.uint8).view(count, 1)
    return (packed.unsqueeze(-2) >> shifts) & 1


def _grouped(
    codes: torch.Tensor,  # [rows, blocks, ...] any integer type, row-major values
    scales: torch.Tensor,  # [rows, blocks, groups per block] float32
    offsets: torch.Tensor | None,
    group_size: int,
    code_range: tuple[int, int],
    kind: str,
) -> GroupAffine:
    rows = codes.shape[0]
    return GroupAffine(
        codes.reshape(rows, -1).to(torch.int8),
        scales.reshape(rows, -1),
        None if offsets is None else offsets.reshape(rows, -1),
        group_size,
        code_range[0],
        code_range[1],
        kind,
    )


def _q4_0(raw: torch.Tensor) -> GroupAffine:
    d = _fp16(raw, 0)
    q = _nibbles(raw[..., 2:18]).to(torch.int16) - 8
    return _grouped(q, d.unsqueeze(-1), None, 32, (-8, 7), "Q4_0")


def _q4_1(raw: torch.Tensor) -> GroupAffine:
    d, m = _fp16(raw, 0), _fp16(raw, 2)
    q = _nibbles(raw[..., 4:20])
    return _grouped(q, d.unsqueeze(-1), m.unsqueeze(-1), 32, (0, 15), "Q4_1")


def _five_bit(qh: torch.Tensor, qs: torch.Tensor) -> torch.Tensor:
    """Q5_0 / Q5_1 codes: 4 low bits as nibbles, the fifth bit from a u32."""
    high = _bits(qh, 8).transpose(-1, -2).reshape(*qh.shape[:-1], 32)  # bit i of the u32
    return _nibbles(qs).reshape(*qs.shape[:-1], 32).to(torch.int16) | (high.to(torch.int16) << 4)


def _q5_0(raw: torch.Tensor) -> GroupAffine:
    d = _fp16(raw, 0)
    q = _five_bit(raw[..., 2:6], raw[..., 6:22]) - 16
    return _grouped(q, d.unsqueeze(-1), None, 32, (-16, 15), "Q5_0")


def _q5_1(raw: torch.Tensor) -> GroupAffine:
    d, m = _fp16(raw, 0), _fp16(raw, 2)
    q = _five_bit(raw[..., 4:8], raw[..., 8:24])
    return _grouped(q, d.unsqueeze(-1), m.unsqueeze(-1), 32, (0, 31), "Q5_1")


def _q8_0(raw: torch.Tensor) -> GroupAffine:
    d = _fp16(raw, 0)
    q = raw[..., 2:34].contiguous().view(torch.int8)
    return _grouped(q, d.unsqueeze(-1), None, 32, (-128, 127), "Q8_0")


def _k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The eight 6-bit (scale, min) pairs of a Q4_K / Q5_K block (12 bytes)."""
    low, mid, top = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scale = torch.cat([low & 0x3F, (top & 0x0F) | ((low >> 2) & 0x30)], dim=-1)
    minimum = torch.cat([mid & 0x3F, (top >> 4) | ((mid >> 2) & 0x30)], dim=-1)
    return scale.float(), minimum.float()


def _k_affine(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    d, dmin = _fp16(raw, 0), _fp16(raw, 2)
    scale, minimum = _k_scales(raw[..., 4:16])
    return d.unsqueeze(-1) * scale, -(dmin.unsqueeze(-1) * minimum)


def _q4_k(raw: torch.Tensor) -> GroupAffine:
    scales, offsets = _k_affine(raw)
    # 4 chunks of 32 bytes; a chunk's low nibbles are one group, its high the next.
    qs = raw[..., 16:144].reshape(*raw.shape[:-1], 4, 32)
    return _grouped(_nibbles(qs), scales, offsets, 32, (0, 15), "Q4_K")


def _q5_k(raw: torch.Tensor) -> GroupAffine:
    scales, offsets = _k_affine(raw)
    qs = raw[..., 48:176].reshape(*raw.shape[:-1], 4, 32)
    high = _bits(raw[..., 16:48], 8)  # [..., 8 groups, 32]: bit g is group g's fifth bit
    low = _nibbles(qs).reshape(*raw.shape[:-1], 8, 32)
    q = low.to(torch.int16) | (high.to(torch.int16) << 4)
    return _grouped(q, scales, offsets, 32, (0, 31), "Q5_K")


def _q6_k(raw: torch.Tensor) -> GroupAffine:
    lead = raw.shape[:-1]
    ql = raw[..., 0:128].reshape(*lead, 2, 64)
    qh = raw[..., 128:192].reshape(*lead, 2, 32)
    sc = raw[..., 192:208].contiguous().view(torch.int8).float()
    d = _fp16(raw, 208)
    low = _nibbles(ql).reshape(*lead, 8, 32)
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(4, 1)
    high = ((qh.unsqueeze(-2) >> shifts) & 3).reshape(*lead, 8, 32)
    q = (low.to(torch.int16) | (high.to(torch.int16) << 4)) - 32
    return _grouped(q, d.unsqueeze(-1) * sc, None, 16, (-32, 31), "Q6_K")


DECODERS: dict[GGMLQuantizationType, Callable[[torch.Tensor], GroupAffine]] = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}


def decode_blocks(raw: torch.Tensor, quant_type: GGMLQuantizationType) -> GroupAffine:
    """``[rows, blocks * type_size]`` uint8 -> the ``[rows, blocks * block_size]`` matrix."""
    type_size = GGML_QUANT_SIZES[quant_type][1]
    rows = raw.shape[0]
    if raw.shape[1] % type_size:
        raise ValueError(f"{raw.shape[1]} bytes per row are not whole {quant_type.name} blocks")
    blocks = raw.reshape(rows, raw.shape[1] // type_size, type_size)
    return DECODERS[quant_type](blocks)
