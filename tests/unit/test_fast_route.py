"""The fast route and typer read every command line the same way.

Table-driven from the declarations themselves (commands/decl.py rows, ctl's
ACTIONS, serve's SERVE_OPTIONS): for every declared command, command lines
are generated from its rows (each option in each spelling, each switch on
and off, values inline and apart, options before and after the arguments),
run through both routes with the command's function replaced by a recorder,
and the calls compared. A line typer accepts must be taken by the fast route
too (so scripts never pay for typer), and a line typer refuses must be left
to typer (so its usage message is the one shown).
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import pytest

from vtpmctl import cli
from vtpmctl.commands import ctl as ctl_module
from vtpmctl.commands import decl

MODULES = sorted(set(cli.ROUTES.values()))
DECLARED = [cmd for m in MODULES for cmd in importlib.import_module(m).COMMANDS]

SAMPLE = {decl.TEXT: "word", decl.INT: "3", decl.FLOAT: "2.5", decl.PATH: "/tmp/some file"}


class Called(Exception):
    """The recorder ran: carries (module, function, kwargs)."""


_SIGNATURES: dict[tuple[str, str], inspect.Signature] = {}


def _signature(module: str, function: str) -> inspect.Signature:
    if (module, function) not in _SIGNATURES:
        original = getattr(importlib.import_module(module), function)
        _SIGNATURES[module, function] = inspect.signature(original)
    return _SIGNATURES[module, function]


def _bound(module: str, function: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
    """The arguments of a call of module.function, by name, defaults filled in."""
    bound = _signature(module, function).bind(*args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _record(monkeypatch: pytest.MonkeyPatch, module: str, function: str) -> None:
    def recorder(*args: Any, **kwargs: Any) -> int:
        raise Called((module, function, _bound(module, function, *args, **kwargs)))

    _signature(module, function)  # the original's, before it is replaced
    monkeypatch.setattr(importlib.import_module(module), function, recorder)


def _fast(line: list[str]) -> Any:
    """The fast route's plan for LINE with the function's defaults filled in, or None."""
    plan = cli._fast_plan(list(line))
    if plan is None:
        return None
    module, function, kwargs = plan
    return (module, function, _bound(module, function, **kwargs))


_APP = cli.build_app()  # the commands look their function up when they run


def _typer_call(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> Any:
    """What the typer route calls for ARGS, or None when it refuses them."""
    monkeypatch.setattr(cli, "build_app", lambda: _APP)
    try:
        code = cli._run_typer(list(args))
    except Called as called:
        return called.args[0]
    assert code != 0, f"typer ran {args} without calling anything"
    return None


def _values(param: decl.Param) -> list[str]:
    if param.kind == decl.CHOICE:
        assert param.choices is not None
        return [c.value for c in param.choices]
    return [SAMPLE[param.kind]]


def _lines(cmd: decl.Command) -> list[list[str]]:
    """Command lines for CMD built from its rows."""
    words = list(cmd.words)
    args = [p for p in cmd.params if p.kind == decl.ARG]
    required = [f"arg{i}" for i, p in enumerate(args) if p.required]
    every = [f"arg{i}" for i in range(len(args))]
    lines = [words + required, words + every]
    everything: list[str] = []
    for p in cmd.params:
        if p.kind == decl.ARG:
            continue
        for spelling in p.spellings():
            if p.kind == decl.SWITCH:
                lines.append(words + required + [spelling])
                lines.append(words + [spelling] + required)
                continue
            for value in _values(p):
                lines.append(words + required + [spelling, value])
                lines.append(words + [spelling, value] + every)
                if spelling.startswith("--"):
                    lines.append(words + required + [f"{spelling}={value}"])
        first = next(iter(p.spellings()))
        everything += [first] if p.kind == decl.SWITCH else [first, _values(p)[-1]]
    lines.append(words + required + everything)
    lines.append(words + everything + every)
    if cmd.timeout:
        lines += [["--timeout", "2.5", *line] for line in lines[:3]]
        lines.append(["--timeout=0.5", *lines[0]])
    return lines


def _cases() -> list[tuple[decl.Command, list[str]]]:
    return [(cmd, line) for cmd in DECLARED for line in _lines(cmd)]


def _fix_required_options(cmd: decl.Command, line: list[str]) -> list[str]:
    """A required option (state export's -o) is part of every line."""
    for p in cmd.params:
        given = {word.partition("=")[0] for word in line}
        if p.kind != decl.ARG and p.required and not set(p.spellings()) & given:
            line = [*line, next(iter(p.spellings())), "-"]
    return line


@pytest.mark.parametrize(
    ("cmd", "line"), _cases(), ids=lambda v: " ".join(v) if isinstance(v, list) else ""
)
def test_both_routes_agree(
    monkeypatch: pytest.MonkeyPatch, cmd: decl.Command, line: list[str]
) -> None:
    line = _fix_required_options(cmd, line)
    module, _, function = cmd.function.partition(":")
    _record(monkeypatch, module, function)
    plan = _fast(line)
    expected = _typer_call(monkeypatch, line)
    if expected is None:
        assert plan is None, f"fast route took {line}, which typer refuses"
        return
    assert plan is not None, f"fast route left {line} to typer"
    assert plan == expected


@pytest.mark.parametrize(
    "line",
    [
        ["status", "a", "--json", "--json"],
        ["status", "--", "a"],
        ["status", "-a"],
        ["status", "a", "--help"],
        ["list", "-qj"],
        ["list", "--json=1"],
        ["snapshot", "create", "a", "--keep", "0"],
        ["snapshot", "create", "a", "--keep", "+3"],
        ["snapshot", "create", "a", "--keep", " 3"],
        ["snapshot", "create", "a", "--label", "-x"],
        ["snapshot", "create", "a", "--label="],
        ["state", "export", "unix:/x", "-o", "-", "-t", "PERMANENT"],
        ["state", "export", "unix:/x", "-o-"],
        ["migrate", "export", "a", "x", "-o", "y"],
        ["migrate", "export", "a", "-", "--json"],
        ["migrate", "import", "b", "--no-encrypt", "--key-file", "k"],
        ["migrate", "import", "b", "--key-file", ""],
        ["create", "a", "--ek", "--no-ek"],
        ["create", "a", "--tpm", "3"],
        ["start", "a", "--replicate", "r", "--lease-duration", "1e3"],
        ["start", "a", "--replicate", "r", "--lease-duration", "7"],
        ["start", "a", "--replicate", "r", "--lease-duration", ".5"],
        ["start", "a", "--replicate", "r", "--lease-duration", "5."],
        ["caps", "--json"],
        ["caps", "a", "b"],
        ["--timeout", "0", "caps", "a"],
        ["--timeout", "nan", "caps", "a"],
        ["--version"],
        ["ctl", "a", "locality"],
        ["ctl", "a", "locality", "256"],
        ["ctl", "a", "init", "--delete-volatile", "--delete-volatile"],
        ["ctl", "--json", "a", "init"],
    ],
)
def test_odd_lines_mean_the_same_or_go_to_typer(
    monkeypatch: pytest.MonkeyPatch, line: list[str]
) -> None:
    """Whatever the fast route takes, typer takes the same way."""
    plan = _fast(line)
    if plan is None:
        return
    module, function, _ = plan
    _record(monkeypatch, module, function)
    assert _typer_call(monkeypatch, line) == plan


def _ctl_lines() -> list[list[str]]:
    lines = []
    for spec in ctl_module.ACTIONS.values():
        base = ["ctl", "unix:/x", spec.name]
        lines.append(base)
        if spec.switch is not None:
            lines.append([*base, spec.switch[0]])
        if spec.value != ctl_module.NO_VALUE:
            lines += [[*base, "0"], [*base, str(spec.largest)], [*base, str(spec.largest + 1)]]
        lines.append(["--timeout", "3", *base])
    return lines


@pytest.mark.parametrize("line", _ctl_lines(), ids=" ".join)
def test_ctl_routes_agree(monkeypatch: pytest.MonkeyPatch, line: list[str]) -> None:
    _record(monkeypatch, "vtpmctl.commands.ctl", "ctl")
    plan = _fast(line)
    expected = _typer_call(monkeypatch, line)
    if expected is None:
        assert plan is None
        return
    assert plan == expected


def test_routes_cover_exactly_the_declared_commands() -> None:
    declared = {cmd.words[0] for cmd in DECLARED}
    assert declared == set(cli.ROUTES)
    for cmd in DECLARED:
        module = cmd.function.partition(":")[0]
        assert cli.ROUTES[cmd.words[0]] == module, cmd.words
        assert callable(getattr(importlib.import_module(module), cmd.function.partition(":")[2]))


def test_the_commands_scripts_run_often_are_fast() -> None:
    """The issue's list: each of these must have a fast route."""
    often = {
        ("start",),
        ("stop",),
        ("status",),
        ("list",),
        ("caps",),
        ("info",),
        ("state", "export"),
        ("state", "import"),
        ("snapshot", "create"),
        ("snapshot", "list"),
        ("migrate", "export"),
        ("migrate", "import"),
        ("verify",),
    }
    assert often <= {cmd.words for cmd in DECLARED}


def test_declared_options_are_typers_options() -> None:
    """The typer command built from the rows has exactly the rows' spellings."""
    import typer

    app = cli.build_app()
    root = typer.main.get_command(app)
    for cmd in DECLARED:
        command: Any = root
        for word in cmd.words:
            command = command.commands[word]  # type: ignore[attr-defined]
        seen = set()
        for param in command.params:
            seen.update(param.opts + param.secondary_opts)
        want = {s for p in cmd.params if p.kind != decl.ARG for s in p.spellings()}
        want |= {p.dest for p in cmd.params if p.kind == decl.ARG}
        assert seen - {"-h", "--help"} == want, cmd.words
