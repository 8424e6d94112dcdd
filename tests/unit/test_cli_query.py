"""Command-line parsing for caps/info/ctl/state: the typer-free route and usage errors.

The fast route must accept exactly what typer would accept and produce the same
call; anything it does not recognise must go to typer, which owns every usage
error (exit 2, one line on stderr).
"""

from __future__ import annotations

from typing import Any

import pytest

from vtpmctl import cli

T = "unix:/nonexistent/tpm.ctrl"
Q = "vtpmctl.commands.query"
C = "vtpmctl.commands.ctl"


def q(cmd: str, as_json: bool = False, timeout: float = 10.0) -> cli.Plan:
    return (Q, cmd, {"target": T, "as_json": as_json, "timeout": timeout})


def c(
    action: str, value: int | None = None, delete_volatile: bool = False, timeout: float = 10.0
) -> cli.Plan:
    return (
        C,
        "ctl",
        {
            "target": T,
            "action": action,
            "value": value,
            "delete_volatile": delete_volatile,
            "timeout": timeout,
        },
    )


FAST: list[tuple[list[str], cli.Plan | None]] = [
    (["caps", T], q("caps")),
    (["caps", T, "--json"], q("caps", True)),
    (["caps", "--json", T], q("caps", True)),
    (["info", T], q("info")),
    (["info", T, "--json"], q("info", True)),
    (["--timeout", "2.5", "caps", T], q("caps", timeout=2.5)),
    (["--timeout=1", "info", "--json", T], q("info", True, 1.0)),
    (["ctl", T, "init"], c("init")),
    (["ctl", T, "init", "--delete-volatile"], c("init", delete_volatile=True)),
    (["ctl", T, "stop"], c("stop")),
    (["ctl", T, "shutdown"], c("shutdown")),
    (["ctl", T, "cancel"], c("cancel")),
    (["ctl", T, "store-volatile"], c("store-volatile")),
    (["ctl", T, "locality", "0"], c("locality", 0)),
    (["ctl", T, "locality", "255"], c("locality", 255)),
    (["ctl", T, "reset-established"], c("reset-established")),
    (["ctl", T, "reset-established", "4"], c("reset-established", 4)),
    (["ctl", T, "lock-storage"], c("lock-storage")),
    (["ctl", T, "lock-storage", "4294967295"], c("lock-storage", 0xFFFFFFFF)),
    # Left to typer: help, anything unusual, every error.
    (["caps"], None),
    (["caps", "--help"], None),
    (["caps", T, "-h"], None),
    (["caps", T, "--json", "--json"], None),
    (["caps", T, "x"], None),
    # "-" is a word like any other TARGET to typer (and then not a TPM).
    (["caps", "-"], (Q, "caps", {"target": "-", "as_json": False, "timeout": 10.0})),
    (["info", T, "--jsn"], None),
    (["--timeout", "0", "caps", T], None),
    (["--timeout", "nan", "caps", T], None),
    (["--timeout", "x", "caps", T], None),
    (["--timeout"], None),
    (["--version"], None),
    ([], None),
    (["ctl", T], None),
    (["ctl", T, "bogus"], None),
    (["ctl", "--help"], None),
    (["ctl", T, "locality"], None),
    (["ctl", T, "locality", "256"], None),
    (["ctl", T, "locality", "-1"], None),
    (["ctl", T, "locality", "+1"], None),
    (["ctl", T, "locality", "1", "2"], None),
    (["ctl", T, "stop", "1"], None),
    (["ctl", T, "stop", "--delete-volatile"], None),
    (["ctl", T, "init", "--delete-volatile", "--delete-volatile"], None),
    (["ctl", T, "lock-storage", "4294967296"], None),
    (
        ["state", "export", T, "-o", "-"],
        (
            "vtpmctl.commands.state",
            "export",
            {
                "target": T,
                "output": "-",
                "blob_type": "permanent",
                "decrypted": True,
                "timeout": 10.0,
            },
        ),
    ),
    (["state", "export", T, "-o", "-", "-t", "PERMANENT"], None),
]


@pytest.mark.parametrize("argv, plan", FAST, ids=[" ".join(a) or "(none)" for a, _ in FAST])
def test_fast_plan(argv: list[str], plan: cli.Plan | None) -> None:
    assert cli._fast_plan(list(argv)) == plan


USAGE: list[tuple[list[str], str]] = [
    (["caps"], "Missing argument"),
    (["info"], "Missing argument"),
    (["caps", T, "extra"], "unexpected extra argument"),
    (["caps", "--bogus", T], "No such option"),
    (["nosuchcommand"], "No such command"),
    (["--timeout", "0", "caps", T], "--timeout"),
    (["--timeout", "soon", "caps", T], "--timeout"),
    (["ctl", T, "bogus"], "No such command"),
    (["ctl", T, "locality"], "Missing argument"),
    (["ctl", T, "locality", "256"], "255"),
    (["ctl", T, "locality", "four"], "N"),
    (["ctl", T, "reset-established", "256"], "255"),
    (["ctl", T, "lock-storage", "4294967296"], "4294967295"),
    (["ctl", T, "stop", "1"], "unexpected extra argument"),
    (["ctl", T, "init", "--force"], "No such option"),
    (["state", "export", T], "--output"),
    (["state", "export", T, "-o", "f", "--type", "everything"], "--type"),
    (["state", "import", T], "Missing argument"),
    (["state", "frobnicate"], "No such command"),
]


@pytest.mark.parametrize("argv, needle", USAGE, ids=[" ".join(a) for a, _ in USAGE])
def test_usage_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli._fast_plan(list(argv)) is None
    assert cli.run(list(argv)) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n"), err
    assert err.startswith("vtpmctl")
    assert needle.lower() in err.lower(), err
    assert "--help" in err


@pytest.mark.parametrize("argv", [[], ["ctl"], ["state"]])
def test_bare_group_shows_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(list(argv)) == 2
    out, err = capsys.readouterr()
    assert "Usage" in out and err == ""


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["caps", "--help"],
        ["ctl", T, "--help"],
        ["ctl", T, "locality", "--help"],
        ["state", "export", "-h"],
    ],
)
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(list(argv)) == 0
    assert "Usage" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.run(["--version"]) == 0
    assert capsys.readouterr().out.startswith("vtpmctl ")


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "typer"])
@pytest.mark.parametrize(
    "argv",
    [
        ["caps", T],
        ["info", "--json", T],
        ["ctl", T, "init"],
        ["--debug", "caps", T],
        ["caps", T, "--debug"],
    ],
)
def test_failures_are_one_line_exit_1(
    argv: list[str], fast: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    debug = "--debug" in argv
    assert cli.run(list(argv), fast=fast) == 1
    out, err = capsys.readouterr()
    assert out == ""
    if debug:
        assert "Traceback" in err and "TargetError" in err
    else:
        assert err == (
            f"vtpmctl: {T}: no such socket; is the TPM running? (check the path, or start it)\n"
        )


@pytest.mark.parametrize(
    "argv, remaining, found",
    [
        (["--debug", "caps", T], ["caps", T], True),
        (["caps", T, "--debug"], ["caps", T], True),
        (["caps", T], ["caps", T], False),
        (["state", "import", T, "--", "--debug"], ["state", "import", T, "--", "--debug"], False),
    ],
)
def test_debug_anywhere(argv: list[str], remaining: list[str], found: bool) -> None:
    args: list[Any] = list(argv)
    assert cli._take_debug(args) is found
    assert args == remaining


def test_ctl_commands_are_the_rows_of_the_action_table() -> None:
    """typer's ctl commands, their value and switch, come from commands.ctl.ACTIONS."""
    import typer.main

    from vtpmctl.commands.ctl import ACTIONS, NO_VALUE, REQUIRED

    group = typer.main.get_group(cli.build_app()).commands["ctl"]
    assert list(group.commands) == list(ACTIONS)  # type: ignore[attr-defined]
    for name, spec in ACTIONS.items():
        params = group.commands[name].params  # type: ignore[attr-defined]
        args = [p for p in params if p.param_type_name == "argument"]
        opts = [o for p in params if p.param_type_name == "option" for o in p.opts]
        assert len(args) == (spec.value != NO_VALUE), name
        if args:
            assert args[0].required == (spec.value == REQUIRED), name
        assert opts == ([spec.switch[0]] if spec.switch else []), name
