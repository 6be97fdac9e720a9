"""``bench/kernel_bench``'s decode rounds alternated with llama-bench, and
their report. A stand-in ``llama-bench`` (a script printing its JSON) keeps
llama.cpp out of the suite, as the bench keeps it optional; the committed
results come from the real binary."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from specray.actors.model.loader import load_model
from specray.bench.kernel_bench import Runner, paired_decode
from specray.bench.kernel_report import markdown

LLAMA_TOKENS_PER_S = 50.0  # the stand-in's decode speed: 20 ms per token


def fake_llama_bench(directory: Path) -> tuple[Path, Path]:
    """A script answering as ``llama-bench -o json`` does, logging each call."""
    log = directory / "calls.txt"
    script = directory / "llama-bench"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        f"open({str(log)!r}, 'a').write(' '.join(sys.argv[1:]) + '\\n')\n"
        f"print(json.dumps([{{'avg_ts': {LLAMA_TOKENS_PER_S}, 'n_prompt': 0}}]))\n"
    )
    script.chmod(0o755)
    return script, log


def test_paired_rounds_alternate_ours_with_llama_bench(tiny_dir_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model_dir = tiny_dir_factory("qwen2")
    runners = {
        "fp32": Runner(load_model(model_dir, "float32")),
        "gguf": Runner(load_model(model_dir, "float32")),
    }
    for runner in runners.values():  # the context every verify_call runs at
        runner.forward(list(range(64)), 0, 1)
    binary, log = fake_llama_bench(tmp_path)

    paired = paired_decode(runners, binary, tmp_path / "model.gguf", 1, rounds=3)

    # Only formats run on the file are paired; one llama-bench run per round.
    assert list(paired["ours_ms"]) == ["gguf"]
    calls = log.read_text().splitlines()
    assert len(calls) == 3 and all("-r 1" in c and "-d 64" in c for c in calls)
    assert paired["llama_cpp_ms"] == [1e3 / LLAMA_TOKENS_PER_S] * 3
    ours = paired["ours_ms"]["gguf"]
    assert len(ours) == 3 and all(ms > 0 for ms in ours)
    assert paired["ratios"]["gguf"] == [ms / 20.0 for ms in ours]


def test_the_decode_goal_is_read_from_paired_rounds() -> None:
    timing = {
        "decode_ms_per_token": 30.0,
        "verify_cost_ratio": {"1": 1.0, "9": 2.0},
        "prefill_512_tokens_per_s": 100.0,
        "load_s": 1.0,
        "param_bytes": 1,
        "kernels": {},
        "agreement": {},
    }
    llama = {
        "decode_ms_per_token": 10.0,  # unpaired: 3x, far over the goal
        "verify_cost_ratio": {"1": 1.0, "9": 4.0},
        "prefill_512_tokens_per_s": 90.0,
    }
    paired = {
        "rounds": 3,
        "llama_cpp_ms": [20.0, 25.0, 20.0],
        "ours_ms": {"gguf": [22.0, 30.0, 26.0]},
        "ratios": {"gguf": [1.1, 1.2, 1.3]},
    }
    result = {
        "model": "m",
        "gguf": "m.gguf",
        "threads": 2,
        "cpu": "cpu",
        "torch": "t",
        "load_average_start": [0.0],
        "gguf_int4_share": 0.5,
        "models": {"gguf": timing},
        "llama_cpp": llama,
        "agreement_reference": "gguf",
        "paired_decode": paired,
    }
    text = markdown(json.loads(json.dumps(result)))
    assert "| 2 | 30.0 | 25.0 | 1.20 |" in text
    median = statistics.median(paired["ratios"]["gguf"])
    assert f"gguf: {median:.2f}x llama.cpp's time per token (median of 3 paired rounds" in text
    assert ": met." in text
    del result["paired_decode"]
    assert "3.00x llama.cpp's time per token (30.0 ms vs llama.cpp 10.0 ms, not paired" in (
        markdown(result)
    )
