"""``bench/shard_decode``: a served target shard (a real Ray actor) and the
same model in this process decode the same tokens, each timed."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from specray.bench.common import machine_line
from specray.bench.shard_decode import main


def test_the_shard_and_the_local_model_decode_alike(
    local_ray: None, tiny_dir_factory, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    config = tmp_path / "tiny.serve.yaml"
    router = {"target": str(model_dir), "dtype": "float32", "threads_per_shard": 1}
    router |= {"max_len": 32, "num_slots": 2, "drafts": [{"kind": "ngram"}]}
    config.write_text(yaml.safe_dump({"backend": "router", "router": router}))
    flags = ["--config", str(config), "--contexts", "5,40", "--steps", "6", "--repeats", "2"]
    result = main([*flags, "--out", str(tmp_path), "--tag", "_t"])

    saved = json.loads((tmp_path / "shard_decode_tiny_t.json").read_text())
    assert saved["rows"] == result["rows"] and result["threads"] == 1
    assert [row["context"] for row in result["rows"]] == [5, 40]
    for row in result["rows"]:
        assert row["same_tokens"]  # both arms ran one model, greedy
        assert all(
            len(row["ms"][arm]) == 2 and min(row["ms"][arm]) > 0 for arm in ("shard", "local")
        )
    # the longest context plus its steps fit although the config's max_len is shorter
    assert result["model"]["max_len"] >= 40 + 6 + 1
    report = (tmp_path / "shard_decode_tiny_t.md").read_text()
    assert "| 40 |" in report and "shard ÷ local" in report
    assert machine_line(result["machine"]) in report  # the CPU and its flags
