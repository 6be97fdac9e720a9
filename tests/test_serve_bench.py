"""`specray bench serve` for real: short runs against a real gRPC server (the
in-process engine on a tiny model with a real tokenizer and chat template),
and the pure parts of what it sends and when."""

from __future__ import annotations

import itertools
import json
import shlex
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving_helpers import ServingThread, save_served_model, serve_config
from transformers import AutoTokenizer

from specray.bench.common import chat_ids
from specray.bench.prompts import load_prompts
from specray.bench.serve_bench import reproduce_command
from specray.bench.serve_dataset import (
    BenchPrompt,
    ab_schedule,
    arrival_offsets,
    random_prompts,
    shipped_prompts,
)
from specray.bench.serve_report import cache_caveat, markdown
from specray.deploy.cli import build_parser, main

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

# ---------------------------------------------------------------- pure parts


def test_pairs_alternate_which_arm_goes_first() -> None:
    prompts = [BenchPrompt(f"p{i}", "chat", "hello") for i in range(3)]
    plan = ab_schedule(prompts, "pairs")
    sent = [(r.prompt.id, r.speculative) for r in plan]
    assert sent == [
        ("p0", True),
        ("p0", False),
        ("p1", False),
        ("p1", True),
        ("p2", True),
        ("p2", False),
    ]
    assert [r.index for r in plan] == [0, 0, 1, 1, 2, 2]
    flipped = ab_schedule(prompts, "pairs", spec_first=False)
    assert [r.speculative for r in flipped[:2]] == [False, True]


def test_phases_send_one_arm_then_the_other() -> None:
    prompts = [BenchPrompt(f"p{i}", "chat", "hello") for i in range(2)]
    plan = ab_schedule(prompts, "phases", spec_first=False)
    assert [(r.prompt.id, r.speculative) for r in plan] == [
        ("p0", False),
        ("p1", False),
        ("p0", True),
        ("p1", True),
    ]
    with pytest.raises(ValueError, match="--ab-order must be one of pairs, phases, got 'x'"):
        ab_schedule(prompts, "x")


def test_poisson_arrivals_are_seeded_and_average_the_rate() -> None:
    offsets = arrival_offsets(4000, 20.0, seed=7)
    assert offsets == arrival_offsets(4000, 20.0, seed=7)
    assert offsets != arrival_offsets(4000, 20.0, seed=8)
    assert offsets[0] == 0.0 and offsets == sorted(offsets)
    mean_gap = offsets[-1] / (len(offsets) - 1)
    assert mean_gap == pytest.approx(1 / 20.0, rel=0.1)
    assert arrival_offsets(3, float("inf"), seed=7) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="--request-rate must be > 0, got 0"):
        arrival_offsets(3, 0, seed=7)


def test_shipped_prompts_cover_categories_round_robin_then_cycle() -> None:
    chosen = shipped_prompts(12, ["chat", "math"], "eval", seed=1, tokenizer=None)
    assert [p.category for p in chosen[:4]] == ["chat", "math", "chat", "math"]
    firsts = chosen[:8]
    assert len({p.id for p in firsts}) == 8  # the 8 eval prompts, each once
    assert [p.id for p in chosen[8:]] == [f"{p.id}#2" for p in firsts[:4]]
    texts = {p.id: p.prompt for p in load_prompts(["chat", "math"], "eval")}
    assert all(p.prompt == texts[p.id.split("#")[0]] for p in chosen)
    assert chosen == shipped_prompts(12, ["chat", "math"], "eval", seed=1, tokenizer=None)
    assert chosen != shipped_prompts(12, ["chat", "math"], "eval", seed=2, tokenizer=None)


def test_shipped_sessions_keep_their_turns_in_order() -> None:
    chosen = shipped_prompts(None, ["agentic", "code_edit"], "eval", seed=3, tokenizer=None)
    turns = load_prompts(["agentic"], "eval")
    assert sorted(p.id for p in chosen if p.category == "agentic") == sorted(p.id for p in turns)
    order = {p.id: i for i, p in enumerate(chosen)}
    for earlier, later in itertools.pairwise(turns):
        if earlier.session == later.session:
            assert order[earlier.id] < order[later.id]
    sessions_first = [p.id for p in chosen if p.category == "agentic" and p.id.endswith("-t1")]
    other_seed = shipped_prompts(None, ["agentic"], "eval", seed=4, tokenizer=None)
    assert sessions_first != [p.id for p in other_seed if p.id.endswith("-t1")]  # sessions shuffled


def test_random_prompts_have_the_length_and_stay_in_the_vocabulary() -> None:
    prompts = random_prompts(5, [12], vocab_size=50, seed=3)
    assert [len(p.prompt) for p in prompts] == [12] * 5
    assert all(0 <= t < 50 for p in prompts for t in p.prompt)
    assert prompts == random_prompts(5, [12], vocab_size=50, seed=3)
    mixed = random_prompts(5, [6, 2], vocab_size=50, seed=3)  # lengths cycle: a mix
    assert [len(p.prompt) for p in mixed] == [6, 2, 6, 2, 6]
    with pytest.raises(ValueError, match="input_lens must be lengths >= 1"):
        random_prompts(2, [], vocab_size=50, seed=3)


def _result(drafts: list[str], levels: list[list[str]]) -> dict[str, Any]:
    runs = [{"records": [{"prompt_id": p} for p in prompt_ids]} for prompt_ids in levels]
    return {"model": {"drafts": drafts}, "runs": runs}


@pytest.mark.parametrize(
    ("drafts", "levels", "warned"),
    [
        (["suffix"], [["a", "b"], ["a", "b"]], True),  # a later level resends a and b
        (["suffix"], [["a", "b", "a#2"]], True),  # a cycled within the level
        (["ngram+suffix"], [["a"], ["a"]], True),
        (["suffix"], [["a", "b"]], False),  # each prompt once
        (["ngram"], [["a"], ["a"]], False),  # nothing kept across requests
        ([], [["a"], ["a"]], False),
    ],
)
def test_a_resent_prompt_under_a_caching_drafter_is_called_out(
    drafts: list[str], levels: list[list[str]], warned: bool
) -> None:
    lines = cache_caveat(_result(drafts, levels))
    assert bool(lines) == warned
    if warned:
        assert lines[0].startswith("Caution: the drafter") and "freshly started server" in lines[0]


# ---------------------------------------------------------------- real runs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_served_model(tmp_path_factory.mktemp("served"))


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[ServingThread]:
    # Shipped prompts run to ~250 tokens under the tiny tokenizer: room for them.
    limits = {"max_tokens": 256, "max_queued_requests": 16}
    # A prefix cache that holds several whole prompts (the priming test reads it).
    config = serve_config(model_dir, max_len=1024, limits=limits, prefix_cache_tokens=4096)
    with ServingThread(config) as serving:
        yield serving


def _bench(server: ServingThread, out: Path, flags: list[str]) -> dict[str, Any]:
    """Run ``specray bench serve`` against ``server``; its result file, parsed."""
    argv = ["bench", "serve", "--server", server.grpc_address, *flags, "--save-result", str(out)]
    assert main(argv) == 0
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def _random_bench(
    server: ServingThread, out: Path, output_len: int, flags: list[str]
) -> dict[str, Any]:
    """:func:`_bench` on random 8-token prompts, each asking for ``output_len`` tokens."""
    lengths = ["--random-input-len", "8", "--random-output-len", str(output_len)]
    return _bench(server, out, ["--dataset", "random", *lengths, *flags])


@pytest.fixture(scope="module")
def shipped_run(
    server: ServingThread, model_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A two-level sweep over four chat and math prompts, greedy, 16 tokens each."""
    out = tmp_path_factory.mktemp("bench") / "ngram.json"
    flags = ["--tokenizer", str(model_dir), "--categories", "chat,math", "--num-prompts", "4"]
    flags += ["--max-tokens", "16", "--ignore-eos", "--sweep-concurrency", "1,2"]
    _bench(server, out, flags)
    return out


def test_result_file_is_well_formed(shipped_run: Path, model_dir: Path) -> None:
    result = json.loads(shipped_run.read_text())
    assert set(result) >= {"command", "label", "model", "settings", "machine", "runs"}
    assert result["label"] == "ngram" and result["model"]["drafts"] == ["ngram"]
    assert result["command"].startswith("specray bench serve --server ")
    assert [run["concurrency"] for run in result["runs"]] == [1, 2]
    # The second level resends the first level's prompts: the prefix cache
    # serves part of each, in both arms.
    second = result["runs"][1]["modes"]
    assert second["spec"]["cached_tokens"] > 0 and second["no_spec"]["cached_tokens"] > 0
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = {p.id: p.prompt for p in load_prompts(["chat", "math"])}
    for run in result["runs"]:
        spec, base = run["modes"]["spec"], run["modes"]["no_spec"]
        for arm in (spec, base):
            assert (arm["requests"], arm["completed"], arm["failed"]) == (4, 4, 0)
            assert arm["output_tokens"] == 4 * 16
            for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
                assert set(arm[key]) == {"mean", "median", "p99"}
                assert 0 < arm[key]["median"] <= arm[key]["p99"]
        assert base["draft_tokens"] == 0 and base["tau"] == 1.0
        assert spec["draft_tokens"] > 0 and spec["tau"] > 1.0  # n-gram proposals accepted
        records = run["records"]
        assert sorted(r["speculative"] for r in records) == [False] * 4 + [True] * 4
        for r in records:
            # The chat template was applied on the client: the server saw its ids.
            assert r["prompt_tokens"] == len(chat_ids(tokenizer, texts[r["prompt_id"]]))
            assert r["finish_reason"] == "length" and sum(r["chunk_tokens"]) == 16
            assert 0 <= r["cached_tokens"] <= r["prompt_tokens"]
        rows = {row["category"]: row for row in run["categories"]}
        assert [rows[c]["pairs"] for c in ("chat", "math", "all")] == [2, 2, 4]
        assert all(row["speedup"] > 0 and row["tpot_speedup"] > 0 for row in rows.values())
    # One request at a time, fp32: speculation must be lossless, token for token.
    assert result["runs"][0]["agreement"]["identical"] == 4


def test_markdown_and_plots_are_written_next_to_the_json(shipped_run: Path) -> None:
    stem = shipped_run.with_suffix("")
    text = stem.with_name("ngram.md").read_text()
    assert "#### concurrency 1" in text and "#### concurrency 2" in text
    assert "multi-token chunk (one speculative round) as one gap" in text
    assert "Greedy outputs token-identical in 4 of 4 pairs" in text
    assert "Caution" not in text  # n-gram keeps nothing across requests
    for suffix in ("_speedup.png", "_tpot.png"):
        assert stem.with_name(f"ngram{suffix}").read_bytes().startswith(PNG_MAGIC)


def test_plot_from_combines_runs_by_label(shipped_run: Path, tmp_path: Path) -> None:
    other = json.loads(shipped_run.read_text()) | {"label": "draft-model"}
    second = tmp_path / "other.json"
    second.write_text(json.dumps(other))
    combined = tmp_path / "all.json"
    assert (
        main(
            [
                "bench",
                "serve",
                "--plot-from",
                str(shipped_run),
                str(second),
                "--save-result",
                str(combined),
            ]
        )
        == 0
    )
    text = (tmp_path / "all.md").read_text()
    assert "drafter ngram" in text and "drafter draft-model" in text
    assert "| draft-model | 2 |" in text  # the TPOT-against-concurrency table
    assert (tmp_path / "all_tpot.png").read_bytes().startswith(PNG_MAGIC)
    assert not combined.exists()  # a combination has no result JSON of its own


def test_rejected_requests_count_as_failed_with_their_status(
    server: ServingThread, tmp_path: Path
) -> None:
    out = tmp_path / "rejected.json"
    flags = ["--num-prompts", "3", "--request-rate", "50", "--max-concurrency", "2"]
    # The server allows at most k = 4: every spec request fails validation.
    flags += ["--num-speculative-tokens", "99", "--warmup", "0"]
    (run,) = _random_bench(server, out, 6, flags)["runs"]
    spec, base = run["modes"]["spec"], run["modes"]["no_spec"]
    assert (spec["requests"], spec["completed"], spec["failed"]) == (3, 0, 3)
    assert spec["failures"] == {"INVALID_ARGUMENT": 3}
    assert spec["tpot_ms"]["mean"] is None and spec["output_tokens_per_s"] is None
    assert (base["completed"], base["failed"], base["output_tokens"]) == (3, 0, 18)
    failed = [r for r in run["records"] if r["error"]]
    assert len(failed) == 3 and all("num_speculative_tokens" in r["error_details"] for r in failed)
    assert [(row["pairs"], row["speedup"]) for row in run["categories"]] == [(0, None)] * 2
    text = out.with_suffix(".md").read_text()
    assert "- spec: 3 × INVALID_ARGUMENT: " in text


def test_phases_finish_one_arm_before_the_other_starts(
    server: ServingThread, tmp_path: Path
) -> None:
    flags = ["--num-prompts", "3", "--ab-order", "phases", "--max-concurrency", "2"]
    (run,) = _random_bench(server, tmp_path / "phases.json", 4, flags)["runs"]
    records = run["records"]
    assert [r["speculative"] for r in records] == [True] * 3 + [False] * 3  # spec first
    first_done = max(r["chunk_s"][-1] for r in records[:3])
    assert first_done <= min(r["send_s"] for r in records[3:])
    assert run["modes"]["spec"]["completed"] == run["modes"]["no_spec"]["completed"] == 3
    assert run["diagnostics"] == {}  # the in-process engine keeps no router diagnostics


def test_a_level_sends_at_least_as_many_prompts_as_its_concurrency(
    server: ServingThread, tmp_path: Path
) -> None:
    flags = ["--num-prompts", "2", "--sweep-concurrency", "1,3", "--ab-order", "phases"]
    result = _random_bench(server, tmp_path / "levels.json", 3, flags)
    first, second = result["runs"]
    assert first["modes"]["spec"]["completed"] == first["modes"]["no_spec"]["completed"] == 2
    assert second["modes"]["spec"]["completed"] == second["modes"]["no_spec"]["completed"] == 3
    # The deeper level extends the same prompts, it does not draw new ones first.
    ids = [r["prompt_id"] for r in second["records"] if r["speculative"]]
    assert ids[:2] == [r["prompt_id"] for r in first["records"] if r["speculative"]]
    assert len(set(ids)) == 3 and result["settings"]["prompts"] == ids[:2]


def test_waves_keep_a_level_busy_with_several_times_its_concurrency(
    server: ServingThread, tmp_path: Path
) -> None:
    """``--waves 2``: a level of concurrency 2 sends 4 prompts (closed loop,
    so finished requests are replaced), a level of 1 its ``--num-prompts``."""
    flags = ["--num-prompts", "3", "--sweep-concurrency", "1,2", "--waves", "2", "--ab-order"]
    result = _random_bench(server, tmp_path / "waves.json", 3, [*flags, "phases"])
    first, second = result["runs"]
    assert first["modes"]["spec"]["completed"] == 3
    assert second["modes"]["spec"]["completed"] == second["modes"]["no_spec"]["completed"] == 4
    assert result["settings"]["waves"] == 2 and "--waves 2" in result["command"]
    assert "(2 waves)" in markdown([result])


def test_a_fixed_speculation_run_is_recorded_and_agrees_with_target_only(
    server: ServingThread, tmp_path: Path
) -> None:
    """``--fixed-speculation`` sends the spec arm past the server's budget;
    greedy, its tokens are still target-only's, and the result says so."""
    flags = ["--num-prompts", "2", "--fixed-speculation", "--warmup", "0"]
    result = _random_bench(server, tmp_path / "fixed.json", 6, flags)
    (run,) = result["runs"]
    assert result["settings"]["fixed_speculation"] is True
    assert "--fixed-speculation" in result["command"].split()
    assert run["modes"]["spec"]["completed"] == 2
    assert run["agreement"]["pairs"] == 2 and run["agreement"]["identical"] == 2
    assert "fixed speculation, past the budget" in (tmp_path / "fixed.md").read_text()


def _cached_by_prompt(run: dict[str, Any], speculative: bool) -> dict[str, int]:
    return {
        r["prompt_id"]: r["cached_tokens"]
        for r in run["records"]
        if r["speculative"] == speculative
    }


def test_priming_gives_both_arms_the_same_prefix_cache(
    server: ServingThread, model_dir: Path, tmp_path: Path
) -> None:
    # Categories no other test sends, so each run starts with its prompts uncached.
    flags = ["--tokenizer", str(model_dir), "--num-prompts", "2", "--max-tokens", "4"]
    flags += ["--ab-order", "phases", "--max-concurrency", "2", "--warmup", "0"]
    (cold,) = _bench(
        server, tmp_path / "cold.json", [*flags, "--categories", "code_edit", "--no-prime-cache"]
    )["runs"]
    spec, base = _cached_by_prompt(cold, True), _cached_by_prompt(cold, False)
    assert all(spec[p] < base[p] for p in spec), (spec, base)  # spec went first, cold
    primed = _bench(server, tmp_path / "primed.json", [*flags, "--categories", "agentic"])
    (warm,) = primed["runs"]
    spec, base = _cached_by_prompt(warm, True), _cached_by_prompt(warm, False)
    assert spec == base and all(cached > 0 for cached in spec.values())
    assert "--prime-cache" in primed["command"].split()
    text = (tmp_path / "primed.md").read_text()
    assert "new prompts prefilled once, unmeasured, before both arms" in text


def test_the_reproduce_command_survives_the_shell() -> None:
    parser, _ = build_parser()
    flags = ["--label", "ngram, chunked", "--dataset", "random", "--random-input-len", "8,3"]
    args = parser.parse_args(["bench", "serve", *flags])
    words = shlex.split(reproduce_command(args))
    assert words[:3] == ["specray", "bench", "serve"]
    assert words[words.index("--label") + 1] == "ngram, chunked"
    assert words[words.index("--random-input-len") + 1] == "8,3"
    args = parser.parse_args(["bench", "serve", "--no-prime-cache"])
    assert "--no-prime-cache" in shlex.split(reproduce_command(args))


def test_unreachable_server_is_an_error_not_an_empty_result(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "none.json"
    args = ["--server", f"127.0.0.1:{port}", "--timeout", "10", "--save-result", str(out)]
    assert main(["bench", "serve", *args]) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err
    assert not out.exists()
