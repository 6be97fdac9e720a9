"""The tensor directory of a GGUF file, read without parsing its metadata.

``gguf.GGUFReader`` builds a numpy view per metadata item; a Qwen2.5 file
carries a 151k-token vocabulary and its merges, which takes it ~20 s. A
weight loader needs only the architecture name and where each tensor lies,
so this reads the header once, skipping over every other value.

File layout (GGUF v2/v3, little-endian): magic ``GGUF``, version (u32),
tensor count and metadata count (u64); the metadata key/values; one record
per tensor (name, dims, type, offset); then the tensor data, aligned to
``general.alignment`` (default 32), each tensor at its offset from there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

# Byte size of the scalar metadata value types (GGUF type ids).
SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
STRING, ARRAY = 8, 9
PLAIN_FLOATS = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: rows first (GGUF stores the reverse)
    qtype: GGMLQuantizationType
    offset: int  # from the start of the file

    @property
    def num_elements(self) -> int:
        return int(np.prod(self.shape))


class _Cursor:
    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def unpack(self, fmt: str) -> int:
        (value,) = struct.unpack_from("<" + fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return int(value)

    def string(self) -> str:
        length = self.unpack("Q")
        text = bytes(self.data[self.pos : self.pos + length]).decode("utf-8")
        self.pos += length
        return text

    def skip_value(self, value_type: int) -> None:
        if value_type == STRING:
            length = self.unpack("Q")  # read first: it moves pos
            self.pos += length
        elif value_type == ARRAY:
            item_type, count = self.unpack("I"), self.unpack("Q")
            if item_type in SCALAR_SIZES:
                self.pos += SCALAR_SIZES[item_type] * count
            else:
                for _ in range(count):
                    self.skip_value(item_type)
        else:
            self.pos += SCALAR_SIZES[value_type]


class GGUFIndex:
    """Tensor directory and memory map of one GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        cursor = _Cursor(memoryview(self._map.data))
        if bytes(self._map[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file")
        cursor.pos = 4
        version = cursor.unpack("I")
        if version < 2:
            raise ValueError(f"{self.path}: GGUF version {version} is not supported")
        tensor_count, kv_count = cursor.unpack("Q"), cursor.unpack("Q")
        self.architecture = ""
        alignment = 32
        for _ in range(kv_count):
            key, value_type = cursor.string(), cursor.unpack("I")
            if key == "general.architecture" and value_type == STRING:
                self.architecture = cursor.string()
            elif key == "general.alignment" and value_type == 4:
                alignment = cursor.unpack("I")
            else:
                cursor.skip_value(value_type)
        records = []
        for _ in range(tensor_count):
            name = cursor.string()
            dims = [cursor.unpack("Q") for _ in range(cursor.unpack("I"))]
            qtype = GGMLQuantizationType(cursor.unpack("I"))
            records.append((name, tuple(reversed(dims)), qtype, cursor.unpack("Q")))
        data_start = -(-cursor.pos // alignment) * alignment
        self.tensors = {
            name: TensorInfo(name, shape, qtype, data_start + offset)
            for name, shape, qtype, offset in records
        }

    def data(self, info: TensorInfo) -> np.ndarray:
        """The tensor's bytes as stored: ``[rows, bytes per row]`` uint8 for
        block types, the values themselves for F32 / F16 (a read-only map)."""
        rows = info.shape[:-1]
        if info.qtype in PLAIN_FLOATS:
            dtype = np.dtype(PLAIN_FLOATS[info.qtype])
            count = info.num_elements
            return np.frombuffer(self._map, dtype=dtype, count=count, offset=info.offset).reshape(
                info.shape
            )
        block_size, type_size = GGML_QUANT_SIZES[info.qtype]
        row_bytes = info.shape[-1] // block_size * type_size
        count = int(np.prod(rows, dtype=np.int64)) * row_bytes
        raw = self._map[info.offset : info.offset + count]
        return np.asarray(raw).reshape(*rows, row_bytes)
