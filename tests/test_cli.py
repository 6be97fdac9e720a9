"""The `specray` command as users run it: a real checkpoint, a subprocess,
and the `--json` contract other tools depend on."""

from __future__ import annotations

import json
import socket
import subprocess
import sys

import pytest

from specray.deploy.cli import main

SPECRAY = [sys.executable, "-m", "specray.deploy.cli"]


def _generate(*flags: str) -> dict[str, object]:
    proc = subprocess.run(
        [*SPECRAY, "generate", "--target", "qwen2.5-coder-0.5b-instruct", "--json", *flags],
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


_COMMON = ["--weights", "fp32", "--max-tokens", "24", "--ignore-eos", "--fixed-k"]
_PROMPT = ["--prompt", "x = [1, 2, 3]\ny = [1, 2, 3]\nz = [1, 2,"]


@pytest.fixture(scope="module")
def target_only() -> dict[str, object]:
    """One target-only run that every lossless check compares with."""
    return _generate("--draft", "none", *_COMMON, *_PROMPT)


@pytest.mark.real_model
@pytest.mark.slow
def test_generate_json_contract_and_lossless_greedy(target_only: dict[str, object]) -> None:
    spec = _generate("--draft", "ngram", "--k", "4", *_COMMON, *_PROMPT)
    # A lookup drafter's ceiling may be large; a token tree's nodes count against it.
    suffix = _generate("--draft", "suffix", "--k", "16", *_COMMON, *_PROMPT)
    assert suffix["token_ids"] == target_only["token_ids"]
    assert "mean_acceptance_length" in suffix["stats"]  # type: ignore[operator]
    for result in (target_only, spec):
        assert set(result) >= {"token_ids", "text", "finish_reason", "stats"}
        stats = result["stats"]
        assert isinstance(stats, dict)
        assert set(stats) >= {"draft_tokens", "accepted_tokens", "rounds", "tokens_per_s"}
        assert set(stats) >= {"elapsed_s"}
        assert result["finish_reason"] == "length"
    assert spec["token_ids"] == target_only["token_ids"]
    assert len(target_only["token_ids"]) == 24  # type: ignore[arg-type]
    assert spec["stats"]["draft_tokens"] > 0  # type: ignore[index]
    assert target_only["stats"]["draft_tokens"] == 0  # type: ignore[index]


@pytest.mark.real_model
@pytest.mark.slow
def test_generate_tp2_equals_tp1(target_only: dict[str, object]) -> None:
    """`--tp 2` runs the target as two gloo shards in Ray actors on loopback;
    with the adaptive budget (no --fixed-k) it profiles them first."""
    common = [flag for flag in _COMMON if flag != "--fixed-k"]
    tp2 = _generate("--draft", "ngram", "--tp", "2", *common, *_PROMPT)
    assert tp2["token_ids"] == target_only["token_ids"]


def test_models_list_shows_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "list"]) == 0
    out = capsys.readouterr().out
    for name in ("qwen2.5-coder-0.5b-instruct", "qwen2.5-coder-1.5b-instruct", "gemma-3-270m"):
        assert name in out


@pytest.mark.parametrize("flag", ["--http-port", "--port"])
def test_serve_on_a_busy_port_says_which_flag_to_change(flag: str) -> None:
    """One line naming the cause and the flag, exit code 2, no traceback."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = str(busy.getsockname()[1])
        ports = {"--port": "0", "--http-port": "0", flag: port}
        proc = subprocess.run(
            [*SPECRAY, "serve", "--backend", "engine", "--target", "unused"]
            + [item for pair in ports.items() for item in pair],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and flag in errors[0] and port in errors[0]
