"""Weight formats behind the parallel linear layers: dense, int8, int4.

A parallel layer owns one :class:`LinearWeights` holding its rank's slice
and calls it for ``x · Wᵀ (+ bias)``; which format it is (and which kernel
runs) is decided once, at load time, from what the checkpoint holds:

- dense tensors stay dense in the model dtype;
- 4-bit codes in groups of 32..256 (GGUF Q4_0 / Q4_1 / Q4_K) become
  :class:`Int4Weights`, keeping the codes and the per-group scale and zero;
- any other codes (Q5_*, Q6_K, Q8_0, ...) become :class:`Int8Weights`, one
  scale per output channel; see :func:`linear_weights_from` for where that
  rounds.

Each format also dequantizes itself (``dequantize``), which is what tests
compare its matmul against. The embedding's formats are in
:mod:`specray.actors.parallel.embedding_rows`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from specray.actors.parallel.block_kernel import block_kernel_reason
from specray.actors.parallel.block_weights import BlockWeights, fits_blocks
from specray.actors.parallel.lowbit_kernels import (
    INT4_GROUP_SIZES,
    INT4_ROW_MULTIPLE,
    int4_matmul,
    int8_matmul,
    int8_per_token_matmul,
    pack_int4,
)
from specray.actors.parallel.packed_kernel import packed_linear, unpack
from specray.actors.parallel.quantized import GroupAffine, cat_rows, requantize_int8_per_channel
from specray.actors.parallel.weight_format import LinearWeights, frozen


class DenseWeights(LinearWeights):
    """A plain tensor in the model dtype. On a CPU its matmul is chosen by
    measuring when the model loads (:mod:`specray.actors.parallel.row_kernels`):
    ``F.linear``, ``W · xᵀ`` for 2 to :attr:`transposed_rows` rows, or the
    weight in oneDNN's blocked layout (:meth:`use_packed`)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.out_features, self.in_features = weight.shape
        self.format_name = str(weight.dtype).removeprefix("torch.")
        self.transposed_rows = 0
        # oneDNN's copy of ``weight``; when set, every matmul reads it.
        self.packed: nn.Parameter | None = None
        self._plain_dropped = False

    @classmethod
    def empty(cls, out_features: int, in_features: int, dtype: torch.dtype) -> DenseWeights:
        """Uninitialised until loaded (inference only: no init work)."""
        return cls(torch.empty(out_features, in_features, dtype=dtype))

    def use_packed(self, packed: torch.Tensor, keep_plain: bool) -> None:
        """Run every matmul on ``packed`` (:func:`pack_dense` of this weight).
        Without ``keep_plain`` the row-major copy is freed, and the rare reads
        of the plain matrix (:meth:`matrix`, :meth:`rows`) unpack a copy; an
        embedding table, which looks rows up every step, keeps it."""
        self.packed = frozen(packed)
        if not keep_plain:
            self.weight = frozen(torch.empty(0, dtype=self.weight.dtype))
            self._plain_dropped = True

    def use_plain(self) -> None:
        """Back to ``F.linear`` on the row-major weight for every row count."""
        self.weight = frozen(self.plain())
        self.packed = None
        self._plain_dropped = False
        self.transposed_rows = 0

    def plain(self) -> torch.Tensor:  # [out, in]
        """The row-major weight (unpacked when only the packed copy is kept)."""
        if self._plain_dropped:
            assert self.packed is not None
            return unpack(self.packed)
        return self.weight

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, bias)
        rows = x.numel() // self.in_features
        if 1 < rows <= self.transposed_rows:
            flat = x.reshape(rows, self.in_features)
            out = torch.mm(self.weight, flat.t()).t().contiguous()
            if bias is not None:
                out = out + bias
            return out.reshape(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight, bias)

    def rows(self, token_ids: torch.Tensor) -> torch.Tensor:  # [...] int64 -> [..., in]
        """Rows as an embedding table (a tied embedding and LM head share them)."""
        return F.embedding(token_ids, self.plain())

    def dequantize(self) -> torch.Tensor:
        return self.plain().float()

    def rows_from(
        self, x: torch.Tensor, first: int, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.packed is not None:
            return super().rows_from(x, first, bias)
        return F.linear(x, self.weight[first:], bias)

    def matrix(self, dtype: torch.dtype) -> torch.Tensor:
        if self._plain_dropped:
            # A caller that needs the matrix itself needs it every step: keep
            # the row-major copy from now on.
            self.weight = frozen(self.plain())
            self._plain_dropped = False
        return self.weight if self.weight.dtype == dtype else self.weight.to(dtype)


INT8_KERNELS = ("weight_only", "per_token")


class Int8Weights(LinearWeights):
    """int8 codes with one scale per output channel: ``W = code * scale``.

    :attr:`kernel` is ``weight_only`` (activations stay in the model dtype)
    or, where it measures faster on a CPU, ``per_token``: activations rounded
    to int8 per row and an exact integer product (:func:`int8_per_token_matmul`;
    chosen in :mod:`specray.actors.parallel.int8_kernels`)."""

    def __init__(self, matrix: GroupAffine, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        rows, cols = matrix.shape
        if matrix.group_size != cols or matrix.offsets is not None or matrix.code_min < -128:
            raise ValueError(f"{matrix.kind} is not int8 with one scale per row")
        self.codes = frozen(matrix.codes.to(device))  # [out, in] int8
        self.scales = frozen(matrix.scales[:, 0].to(device=device, dtype=dtype))  # [out]
        self.out_features, self.in_features = rows, cols
        self.format_name = "int8"
        self.kernel = "weight_only"
        # float32 scales for the per-token kernel, which scales in float32.
        self._scales_f32: torch.Tensor | None = None

    def use_kernel(self, kernel: str) -> None:
        """Run every matmul on ``kernel`` (one of :data:`INT8_KERNELS`)."""
        if kernel not in INT8_KERNELS:
            raise ValueError(f"kernel must be one of {INT8_KERNELS}, got {kernel!r}")
        if kernel == "per_token" and self.codes.device.type != "cpu":
            raise ValueError(f"the per_token kernel runs on CPU, not {self.codes.device.type}")
        self.kernel = kernel
        self._scales_f32 = self.scales.float() if kernel == "per_token" else None

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        if self._scales_f32 is not None:
            out = int8_per_token_matmul(x, self.codes, self._scales_f32)
        else:
            out = int8_matmul(x, self.codes, self.scales)
        return out if bias is None else out + bias

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales.float().unsqueeze(1)


class Int4Weights(LinearWeights):
    """4-bit codes with a scale and zero per output channel and group of
    ``group_size`` input features, packed for the int4 kernel of the device."""

    def __init__(self, matrix: GroupAffine, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        if not fits_int4(matrix):
            raise ValueError(f"{matrix.kind} codes do not fit the int4 kernel")
        rows, cols = matrix.shape
        padded = matrix.pad_rows(-(-rows // INT4_ROW_MULTIPLE) * INT4_ROW_MULTIPLE)
        # The kernel computes (c - 8) * scale + zero with c = code - code_min,
        # so zero = offset + scale * (code_min + 8): 0 for codes -8..7 with
        # no offset (Q4_0), one float32 rounding otherwise.
        zeros = padded.scales * (padded.code_min + 8)
        if padded.offsets is not None:
            zeros = zeros + padded.offsets
        kernel_codes = padded.codes.to(torch.int32) - padded.code_min
        self.packed = frozen(pack_int4(kernel_codes, device))
        scales_and_zeros = torch.stack([padded.scales.t(), zeros.t()], dim=-1)
        self.scales_and_zeros = frozen(scales_and_zeros.to(device=device, dtype=dtype))
        self.group_size = matrix.group_size
        self.out_features, self.in_features = rows, cols
        self.format_name = f"int4/g{matrix.group_size}"

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = int4_matmul(x, self.packed, self.group_size, self.scales_and_zeros)
        if out.shape[-1] != self.out_features:
            # Collectives downstream want contiguous tensors.
            out = out[..., : self.out_features].contiguous()
        return out if bias is None else out + bias

    def dequantize(self) -> torch.Tensor:
        # The packed layout is the kernel's own: read it back through the
        # kernel, one identity row per input feature (float32 on CPU, where
        # (c - 8) * scale + zero is then computed without further rounding).
        compute = torch.bfloat16 if self.packed.device.type == "cuda" else torch.float32
        eye = torch.eye(self.in_features, dtype=compute, device=self.packed.device)
        table = self.scales_and_zeros.to(compute)
        columns = int4_matmul(eye, self.packed, self.group_size, table)
        return columns[:, : self.out_features].t().float()


class ConcatWeights(LinearWeights):
    """Formats stacked along output rows (a fused projection whose parts the
    checkpoint stores in different formats)."""

    def __init__(self, parts: Sequence[LinearWeights]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.formats: list[LinearWeights] = list(parts)  # typed view of self.parts
        self.out_features = sum(part.out_features for part in parts)
        self.in_features = parts[0].in_features
        self.format_name = "+".join(part.format_name for part in parts)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = torch.cat([part(x) for part in self.formats], dim=-1)
        if bias is None:
            return out
        return out.add_(bias) if bias.dtype == out.dtype else out + bias

    def dequantize(self) -> torch.Tensor:
        return torch.cat([part.dequantize() for part in self.formats])


def fits_int4(matrix: GroupAffine) -> bool:
    return matrix.code_max - matrix.code_min <= 15 and matrix.group_size in INT4_GROUP_SIZES


def linear_weights_from(
    parts: Sequence[torch.Tensor | GroupAffine], dtype: torch.dtype, device: torch.device
) -> LinearWeights:
    """One format for row blocks read from a checkpoint, stacked in order.

    Dense parts stay dense. 4-bit parts keep their codes (:class:`Int4Weights`):
    exact codes, with the scale and zero stored in ``dtype`` (float32: the
    scale is exact and the zero rounds once; bfloat16 rounds both). Wider
    codes become per-channel int8: exact when a row already has one scale and
    no offset, otherwise each value moves to the nearest multiple of
    ``max|row| / 127`` (at most half that step). Neighbouring parts of one
    format are merged into a single matmul.
    """
    runs: list[tuple[str, list[torch.Tensor | GroupAffine]]] = []
    for part in parts:
        kind = _format_of(part, device)
        if runs and runs[-1][0] == kind:
            runs[-1][1].append(part)
        else:
            runs.append((kind, [part]))
    built = [_build(kind, run, dtype, device) for kind, run in runs]
    return built[0] if len(built) == 1 else ConcatWeights(built)


def _format_of(part: torch.Tensor | GroupAffine, device: torch.device) -> str:
    if isinstance(part, torch.Tensor):
        return "dense"
    if device.type == "cpu" and block_kernel_reason() is None and fits_blocks(part):
        return f"blocks/{part.code_min},{part.code_max}/g{part.group_size}"
    return f"int4/g{part.group_size}" if fits_int4(part) else "int8"


def _build(
    kind: str,
    run: Sequence[torch.Tensor | GroupAffine],
    dtype: torch.dtype,
    device: torch.device,
) -> LinearWeights:
    if kind == "dense":
        dense = [part for part in run if isinstance(part, torch.Tensor)]
        return DenseWeights(torch.cat(dense).to(device=device, dtype=dtype))
    quantized = [part for part in run if isinstance(part, GroupAffine)]
    if kind.startswith("blocks/"):
        return BlockWeights(cat_rows(quantized), dtype)
    if kind == "int8":
        return Int8Weights(
            cat_rows([requantize_int8_per_channel(part) for part in quantized]), dtype, device
        )
    return Int4Weights(cat_rows([_unsigned(part) for part in quantized]), dtype, device)


def _unsigned(matrix: GroupAffine) -> GroupAffine:
    """The same values with codes from 0: ``offset += scale * code_min``.
    Exact without a previous offset (Q4_0: ``-8 * scale``, and the kernel's
    zero ``offset + 8 * scale`` is then exactly 0 again)."""
    if matrix.code_min == 0:
        return matrix
    shift = matrix.scales * matrix.code_min
    offsets = shift if matrix.offsets is None else matrix.offsets + shift
    codes = (matrix.codes.to(torch.int16) - matrix.code_min).to(torch.int8)
    return GroupAffine(
        codes,
        matrix.scales,
        offsets,
        matrix.group_size,
        0,
        matrix.code_max - matrix.code_min,
        matrix.kind,
    )
