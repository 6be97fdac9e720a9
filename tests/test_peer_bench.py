"""``bench/peer_bench``: llama.cpp's server measured by the client specray's
bench uses, and the report that divides every arm by llama.cpp target-only.

A stand-in ``llama-server`` (a script answering ``/health`` and streaming
``/completion`` in llama.cpp's server-sent-event format) keeps llama.cpp out
of the suite, as the bench keeps it optional; the real comparison is a
committed run under ``bench/results/peer/``.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict
from pathlib import Path

from specray.actors.model.weight_plan import WeightPlan
from specray.bench import peer_bench
from specray.bench.peer_report import render, summarize
from specray.bench.peer_runs import LLAMA, Arm, llama_arm, run_llama, weights_line
from specray.bench.serve_bench import RequestOptions
from specray.bench.serve_dataset import BenchPrompt
from specray.bench.serve_metrics import RequestRecord

EOS = 99

STAND_IN = """\
import json, sys
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
if "--version" in args:
    print("version: 1 (stand-in)")
    sys.exit(0)
port = int(args[args.index("--port") + 1])
drafting = "--spec-type" in args or "-md" in args
log = open(sys.argv[0] + ".calls", "a")

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        log.write(json.dumps([body["prompt"][0], body["n_predict"]]) + "\\n")
        log.flush()
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        count = body["n_predict"]
        # The output: the prompt's first id counting up, then the stop token.
        tokens = [body["prompt"][0] + i for i in range(count - 1)] + [99]
        events = [{"tokens": [token], "stop": False} for token in tokens]
        timings = {"cache_n": 3, "draft_n": 6, "draft_n_accepted": 4}
        events.append({
            "tokens": [], "stop": True, "stop_type": "eos",
            "tokens_evaluated": len(body["prompt"]),
            "timings": timings if drafting and count > 1 else {},
        })
        for event in events:
            self.wfile.write(b"data: " + json.dumps(event).encode() + b"\\n\\n")

HTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


def stand_in(directory: Path) -> Path:
    script = directory / "llama-server"
    script.write_text(f"#!{sys.executable}\n{STAND_IN}")
    script.chmod(0o755)
    return script


def stand_in_calls(directory: Path) -> list[list[int]]:
    """(first prompt id, n_predict) of every request the stand-in served."""
    lines = (directory / "llama-server.calls").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_llama_arm_primes_each_prompt_then_streams_it(tmp_path: Path) -> None:
    binary = stand_in(tmp_path)
    prompts = [BenchPrompt("a", "edit", [10, 1, 2]), BenchPrompt("b", "edit", [20, 1])]
    warmup = [BenchPrompt("warm", "random", [5, 5])]
    options = RequestOptions(8, 0.0, False, 0, None, 30.0)
    arm = llama_arm("ngram-mod", None, 16)
    assert arm.flags == ("--spec-type", "ngram-mod")
    run = run_llama(arm, binary, tmp_path / "t.gguf", prompts, warmup, options, 2, tmp_path, 1)
    calls = stand_in_calls(tmp_path)
    # Warm-up at full length, then each prompt once for one token before its measured send.
    assert calls == [[5, 8], [10, 1], [10, 8], [20, 1], [20, 8]]
    assert [r.prompt_id for r in run.records] == ["a", "b"]
    first = run.records[0]
    assert first.ok and first.speculative
    assert first.token_ids == [10, 11, 12, 13, 14, 15, 16, EOS]
    assert first.output_tokens == 8 and first.prompt_tokens == 3 and first.cached_tokens == 3
    # 8 tokens, 4 of them accepted drafts: 7 after the prefill took 3 forwards.
    assert (first.draft_tokens, first.accepted_tokens, first.rounds) == (6, 4, 3)
    assert run.server_command[run.server_command.index("--host") + 1] == "127.0.0.1"


def test_several_slots_prime_every_prompt_then_send_them_together(tmp_path: Path) -> None:
    binary = stand_in(tmp_path)
    prompts = [BenchPrompt(str(i), "edit", [10 * i, 1]) for i in (1, 2, 3)]
    options = RequestOptions(4, 0.0, False, 0, None, 30.0)
    run = run_llama(
        llama_arm("none", None, 16), binary, tmp_path / "t.gguf", prompts, [], options,
        2, tmp_path, 0, concurrency=2,
    )  # fmt: skip
    calls = stand_in_calls(tmp_path)
    assert calls[:3] == [[10, 1], [20, 1], [30, 1]]
    assert sorted(calls[3:]) == [[10, 4], [20, 4], [30, 4]]
    assert [r.prompt_id for r in run.records] == ["1", "2", "3"]
    assert all(r.ok and not r.speculative and r.rounds == 3 for r in run.records)
    assert run.server_command[run.server_command.index("-np") + 1] == "2"
    assert run.server_command[run.server_command.index("-c") + 1] == str(2 * 4096)


def test_a_draft_arm_needs_its_model() -> None:
    try:
        llama_arm("draft", None, 16)
    except ValueError as error:
        assert "--draft-model" in str(error)
    else:
        raise AssertionError("a draft arm without a draft model was accepted")
    arm = llama_arm("ngram-mod+draft", Path("/m/d.gguf"), 12)
    assert arm.flags == (
        "--spec-type",
        "ngram-mod,draft-simple",
        "-md",
        "/m/d.gguf",
        "--spec-draft-n-max",
        "12",
    )


def record(
    arm_tokens: list[int], speculative: bool, seconds: float, accepted: int
) -> dict[str, object]:
    """One finished request: ``arm_tokens`` streamed evenly over ``seconds``."""
    n = len(arm_tokens)
    times = [seconds * (i + 1) / n for i in range(n)]
    raw = RequestRecord("p", "edit", speculative, 0.0, times, [1] * n, arm_tokens)
    raw.accepted_tokens, raw.draft_tokens = accepted, accepted + 2
    raw.rounds = n - 1 - accepted
    return asdict(raw)


def test_report_divides_every_row_by_llama_target_only(tmp_path: Path) -> None:
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9]
    specray_arm = Arm("specray cfg", "specray", config=Path("cfg.serve.yaml"))
    result = {
        "settings": {
            "target": "t",
            "rounds": 2,
            "threads": 2,
            "draft_model": None,
            "draft_max": 16,
            "prompts": ["p"],
            "split": "eval",
            "max_tokens": 9,
        },
        "arms": [
            {"name": "llama.cpp none", "system": LLAMA},
            {"name": "llama.cpp ngram-mod", "system": LLAMA},
            {"name": specray_arm.name, "system": "specray"},
        ],
        "runs": [
            {"arm": "llama.cpp none", "round": n, "records": [record(tokens, False, 1.0, 0)]}
            for n in (0, 1)
        ]
        + [
            {"arm": "llama.cpp ngram-mod", "round": 0, "records": [record(tokens, True, 0.5, 4)]},
            # A different output from the second round on: counted as not identical.
            {"arm": "llama.cpp ngram-mod", "round": 1, "records": [record([1, 2], True, 0.5, 0)]},
        ]
        + [
            {
                "arm": specray_arm.name,
                "round": n,
                "records": [
                    record([*tokens, EOS], True, 0.25, 6),
                    record(tokens, False, 2.0, 0),
                ],
            }
            for n in (0, 1)
        ],
    }
    rows = {row["row"]: row for row in summarize(result, [EOS])}
    assert rows["llama.cpp none"]["vs_llama_none"] == 1.0
    assert rows["llama.cpp none"]["tau"] == 1.0
    mod = rows["llama.cpp ngram-mod"]
    assert mod["tokens_per_s_by_round"] == [9 / 0.5, 2 / 0.5]
    assert abs(mod["vs_llama_none"] - (11 / 1.0) / (18 / 2.0)) < 1e-9
    assert (mod["identical_to_llama_none"], mod["compared"]) == (1, 2)
    spec = rows["specray cfg (spec)"]
    # The stop token is left off before comparing: the same output.
    assert (spec["identical_to_llama_none"], spec["compared"]) == (2, 2)
    assert (spec["identical_to_own_none"], spec["compared_to_own"]) == (2, 2)
    assert (mod["identical_to_own_none"], mod["compared_to_own"]) == (1, 2)
    assert abs(spec["vs_own_none"] - (10 / 0.25) / (9 / 2.0)) < 1e-9
    # 10 tokens, 6 accepted: 3 forwards after the prefill, per request.
    assert abs(spec["tau"] - 3.0) < 1e-9
    result["summary"] = list(rows.values())
    for run in result["runs"]:
        run["server_command"] = ["serve", run["arm"]]
    plan = WeightPlan("gguf", "bfloat16", "gguf", 1, "gguf is the fastest measured")
    server_log = f"2026-12-06 11:00:00,000 INFO specray.deploy.weights_choice: {plan.log_line()}\n"
    first_specray = next(run for run in result["runs"] if run["arm"] == specray_arm.name)
    first_specray["weights_choice"] = weights_line(server_log)
    result |= {
        "target_gguf": "t.gguf",
        "command": "python -m specray.bench.peer_bench ...",
        "llama_server": {"version": "v"},
        "isa_switches": {"SPECRAY_BLOCK_KERNEL": "avx2"},
        "machine": {
            "cpu": "cpu",
            "cpu_flags": ["avx2"],
            "cpu_count": 2,
            "torch": "x",
            "loadavg": [0.0],
        },
    }
    text = render(result)
    # A saved run is summarized and reported again by the current code.
    saved = tmp_path / "run.json"
    saved.write_text(json.dumps(result | {"eos_ids": [EOS], "summary": []}))
    assert peer_bench.main(["--report-from", str(saved)]) == 0
    assert json.loads(saved.read_text())["summary"] == json.loads(json.dumps(result["summary"]))
    assert saved.with_suffix(".md").read_text() == text
    assert "| specray cfg (spec) | 40.0 | 40.0 / 40.0 | 4.44× | 8.89× |" in text
    assert "avx2" in text
    assert "  - start-up: weights gguf (bfloat16), tp 1: gguf is the fastest measured" in text
    assert "SPECRAY_BLOCK_KERNEL=avx2 (instruction sets restricted)" in text
