"""Every ``specray`` command refusing bad flags: exit status 2, with a message
on stderr that names the flag and the value it got, before any model loads or
Ray starts."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
import ray

from specray.deploy.cli import main


@dataclass(frozen=True)
class Command:
    words: str
    # Flags every case passes; a case's own value for one of them replaces it.
    base_flags: str = ""

    def argv(self, flags: str) -> list[str]:
        args = dict(_pairs(self.base_flags) + _pairs(flags))
        return [*self.words.split(), *itertools.chain.from_iterable(args.items())]


def _pairs(flags: str) -> list[tuple[str, str]]:
    words = flags.split()
    return list(zip(words[::2], words[1::2], strict=True))


# A target that does not exist: were it loaded first, that would be the error.
GENERATE = Command("generate", "--target does-not-matter --prompt hi")
PLAN = Command("plan", "--model v4-pro --gpu h200 --nodes 2")

# Per command, its bad flags and (part of) the message that refuses them.
REFUSALS: dict[Command, list[tuple[str, str]]] = {
    GENERATE: [
        ("--k -1", "--k must be >= 0, got -1"),
        ("--max-tokens 0", "--max-tokens must be >= 1, got 0"),
        ("--temperature -0.5", "--temperature must be >= 0, got -0.5"),
        ("--top-p 1.5", "--top-p must be in (0, 1], got 1.5"),
    ],
    PLAN: [
        ("--gpu h300", "--gpu must be one of ['a100', 'b200', 'h100', 'h200'], got 'h300'"),
        ("--dtype int4", "--dtype must be one of ['bf16', 'fp8'], got 'int4'"),
        ("--nodes 0", "--nodes must be >= 1, got 0"),
        ("--alpha 1.5", "--alpha must be in [0, 1], got 1.5"),
        ("--model v9", "--model must be one of ['v3', 'v4-flash', 'v4-pro'], a V4 config.json"),
        ("--busbw-gbps 0", "--busbw-gbps must be > 0, got 0.0"),
    ],
    Command("cluster check"): [
        ("--min-bytes 4K --max-bytes 1K", "--max-bytes must be >= --min-bytes (4096), got 1024"),
        ("--iters 0", "--iters must be >= 1, got 0"),
        ("--dtype complex64", "--dtype must be one of"),
        ("--min-busbw-gbps 0", "--min-busbw-gbps must be > 0, got 0"),
    ],
    Command("bench serve"): [
        ("--max-concurrency 0", "--max-concurrency must be >= 1, got 0"),
        ("--request-rate -1", "--request-rate must be > 0, got -1.0"),
        ("--sweep-concurrency 1,0", "--sweep-concurrency values must be >= 1, got [1, 0]"),
        ("--random-input-len 3000,0", "--random-input-len values must be >= 1, got [3000, 0]"),
        ("--temperature nan", "--temperature must be >= 0 and finite, got nan"),
        ("--dataset random --categories chat", "applies to --dataset shipped only"),
        ("--categories poetry", "unknown ['poetry']; choose from code_edit"),
    ],
}


@pytest.mark.parametrize(
    ("command", "flags", "message"),
    [
        pytest.param(command, flags, message, id=f"{command.words} {flags}")
        for command, cases in REFUSALS.items()
        for flags, message in cases
    ],
)
def test_bad_flags_are_refused_before_any_work(
    command: Command, flags: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(command.argv(flags)) == 2
    assert message in capsys.readouterr().err
    assert not ray.is_initialized()
