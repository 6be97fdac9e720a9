"""The ``specray`` command refusing bad flags: exit status 2, with a message
on stderr that names the flag and the value it got."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from specray.deploy.cli import main


def bad_flags(*cases: tuple[list[str], str]) -> pytest.MarkDecorator:
    """Runs a test once per case: its ``flags``, and the ``message`` that
    refuses them."""
    return pytest.mark.parametrize(("flags", "message"), cases)


def assert_refused(argv: Sequence[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``specray ARGV`` exits 2 and says ``message`` on stderr."""
    assert main(argv) == 2
    assert message in capsys.readouterr().err
