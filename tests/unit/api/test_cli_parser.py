"""The command line as a newcomer meets it: a version, help on every option, and bad values refused
in one line by argparse (exit 2), never a traceback."""

from __future__ import annotations

import argparse

import pytest

from spendledger import __version__
from spendledger.api.cli import _parser


def subcommands() -> dict[str, argparse.ArgumentParser]:
    [action] = [a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_option_of_every_command_says_what_it_is() -> None:
    for name, command in subcommands().items():
        for action in command._actions:
            if action.dest == "help":
                continue
            assert action.help, f"spendledger {name} {'/'.join(action.option_strings)} has no help"


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"spendledger {__version__}"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["serve", "--config", "c", "--log-level", "loud"], "not a log level"),
        (["serve", "--config", "c", "--workers", "0"], "not a whole number"),
        (["reconcile", "--config", "c", "--concurrency", "-3"], "not a whole number"),
        (["export", "--config", "c", "--from", "yesterday"], "not a day"),
    ],
)
def test_bad_values_are_usage_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(argv)
    assert done.value.code == 2
    assert message in capsys.readouterr().err


def test_log_levels_are_taken_in_any_case() -> None:
    assert _parser().parse_args(["serve", "--config", "c", "--log-level", "debug"]).log_level == "DEBUG"
