"""`vtpmctl serve` has two parsers (typer for help and usage errors, the daemon's own for
speed); they must accept the same options."""

from __future__ import annotations

import pytest
import typer.main

from vtpmctl.cli import _fast_plan, build_app
from vtpmctl.device.server.daemon import build_parser
from vtpmctl.usecases.supervisor import runs_daemon


def _typer_serve_options() -> set[str]:
    group = typer.main.get_group(build_app())
    command = group.commands["serve"]
    return {
        opt
        for param in command.params
        for opt in getattr(param, "opts", [])
        if opt.startswith("--")
    }


def _daemon_options() -> set[str]:
    return {
        opt
        for action in build_parser()._actions
        for opt in action.option_strings
        if opt.startswith("--") and opt != "--help"
    }


def test_both_parsers_know_the_same_options() -> None:
    assert _typer_serve_options() <= _daemon_options()


@pytest.mark.parametrize(
    ("args", "fast"),
    [
        (["serve", "--state", "/s", "--ctrl", "unix:/c"], True),
        (
            ["serve", "--state", "/s", "--cuse", "x", "--tpm", "1.2", "--flags", "not-need-init"],
            True,
        ),
        (["serve", "--state", "/s"], False),  # neither --ctrl nor --cuse
        (["serve", "--state", "/s", "--ctrl", "unix:/c", "--cuse", "x"], False),
        (["serve", "--state", "/s", "--ctrl", "unix:/c", "--tpm", "3"], False),
        (["serve", "--ctrl", "unix:/c"], False),  # --state missing
        (["serve", "--help"], False),
        (["serve", "--state", "/s", "--ctrl", "unix:/c", "--bogus"], False),
    ],
)
def test_fast_route_takes_only_well_formed_lines(args: list[str], fast: bool) -> None:
    assert (_fast_plan(args) is not None) == fast


@pytest.mark.parametrize(
    ("argv", "ours"),
    [
        ([b"/usr/bin/python3", b"-m", b"vtpmctl", b"_daemon", b"--state", b"/s"], True),
        ([b"python3", b"-I", b"-m", b"vtpmctl", b"_daemon", b"--state", b"/s"], True),
        ([b"python3", b"-m", b"vtpmctl.device.server.daemon", b"--state", b"/s"], True),
        ([b"python3", b"-m", b"vtpmctl.engine.daemon", b"--state", b"/s"], True),
        ([b"python3", b"-m", b"vtpmctl", b"serve", b"--state", b"/s"], False),
        ([b"python3", b"-m", b"vtpmctl", b"_inspect"], False),
        ([b"swtpm", b"socket", b"--tpmstate", b"dir=/s"], False),
        ([b"python3", b"-m"], False),
    ],
)
def test_daemon_command_lines_of_every_version_are_recognised(
    argv: list[bytes], ours: bool
) -> None:
    assert runs_daemon(argv) == ours


def test_entry_points_run_the_daemon_module() -> None:
    from vtpmctl.__main__ import ENTRY_POINTS
    from vtpmctl.childproc import entry_argv

    assert ENTRY_POINTS["_daemon"] == "vtpmctl.device.server.daemon"
    assert entry_argv("_daemon")[1:] == ["-m", "vtpmctl", "_daemon"]
