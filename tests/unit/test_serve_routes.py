"""`vtpmctl serve` has two parsers (typer for help and usage errors, the daemon's own for
speed) and a command line built by `vtpmctl start`, all from one table of options;
they must agree, and no option value that cannot be used may create anything."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer.main

from vtpmctl.cli import _fast_plan, build_app
from vtpmctl.device.server.options import SERVE_OPTIONS, build_parser, parse_plain, serve_argv
from vtpmctl.usecases.supervisor import runs_daemon, runs_zygote


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
    aliases = {a for opt in SERVE_OPTIONS for a in opt.aliases}
    assert _typer_serve_options() == _daemon_options() - aliases
    assert _typer_serve_options() == {opt.flag for opt in SERVE_OPTIONS}


def test_the_argv_builder_speaks_the_parser() -> None:
    values = {
        "state": Path("/s"),
        "ctrl": "unix:/c",
        "data": "tcp:127.0.0.1:2322",
        "tpm": "1.2",
        "flags": ["not-need-init", "startup-clear"],
        "key_file": Path("/k"),
        "key_kind": "hex",
        "pid_file": Path("/p"),
        "terminate": True,
        "existing": True,
    }
    ns = vars(build_parser(quiet=True).parse_args(serve_argv(**values)))
    # File names come back as str, spelled as pathlib spells them (vtpmctl.fspath).
    assert {k: ns[k] for k in values} == {
        k: str(v) if isinstance(v, Path) else v for k, v in values.items()
    }
    assert parse_plain(serve_argv(**values)) == ns  # the daemon's own parse of such a line
    untouched = {opt.dest: opt.default for opt in SERVE_OPTIONS if opt.dest not in values}
    assert {k: ns[k] for k in untouched} == untouched
    with pytest.raises(ValueError):
        serve_argv(bogus=1)


@pytest.mark.parametrize("transport", ["socket", "cuse"])
@pytest.mark.parametrize("encrypted", [False, True])
def test_start_builds_a_line_the_daemon_parses(
    tmp_path: Path, transport: str, encrypted: bool
) -> None:
    from vtpmctl.store.instances import Instance, InstanceConfig, InstanceMeta, Registry
    from vtpmctl.store.paths import store_roots
    from vtpmctl.usecases.supervisor import daemon_argv

    paths = Registry(store_roots({"VTPMCTL_HOME": str(tmp_path)})).paths("vm")
    config = InstanceConfig(name="vm", tpm="1.2", transport=transport, encrypted=encrypted)  # type: ignore[arg-type]
    inst = Instance(paths, config, InstanceMeta())
    argv = daemon_argv(inst, incoming=True)
    assert argv[1:4] == ["-m", "vtpmctl", "_daemon"]
    ns = build_parser(quiet=True).parse_args(argv[4:])
    assert parse_plain(argv[4:]) == vars(ns)
    assert ns.state == str(inst.paths.state_dir) and ns.tpm == "1.2" and ns.existing and ns.incoming
    assert (ns.cuse is None) == (transport == "socket") and ns.data is None
    assert ns.key_file == (str(inst.paths.state_key) if encrypted else None)
    assert ns.key_kind == ("hex" if encrypted else "auto")


@pytest.mark.parametrize(
    "argv",
    [
        ["--state", "/s", "--key-kind", "hex", "--flags", "a", "--flags", "b", "--tpm", "2"],
        ["--state", "", "--ctrl", "unix:/c", "--ctrl", "unix:/d", "--incoming"],
    ],
)
def test_the_daemons_own_parse_gives_what_argparse_gives(argv: list[str]) -> None:
    assert parse_plain(argv) == vars(build_parser(quiet=True).parse_args(argv))


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["--ctrl", "unix:/c"],
        ["--state=/s"],
        ["--stat", "/s"],
        ["--state", "/s", "--ctrl"],
        ["--state", "/s", "--ctrl", "-x"],
        ["--state", "/s", "--tpm", "3"],
        ["--state", "/s", "--", "x"],
        ["--state", "/s", "extra"],
        ["--help"],
    ],
)
def test_the_daemon_leaves_any_other_line_to_argparse(argv: list[str]) -> None:
    """Abbreviations, ``=``, missing or odd values: argparse parses them or says what is wrong."""
    assert parse_plain(argv) is None


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize(
    ("option", "needle"),
    [
        (["--ctrl", "bogus"], "bad endpoint"),
        (["--ctrl", "tcp:localhost:99999"], "out of range"),
        (["--ctrl", "unix:/c", "--data", "udp:1"], "unknown endpoint type"),
        (["--ctrl", "unix:" + "x" * 200], "longer than"),
        (["--cuse", "no/slashes"], "bad device name"),
        (["--ctrl", "unix:/c", "--flags", "not-need-init,bogus"], "unknown flag"),
    ],
)
def test_option_values_are_usage_errors_that_create_nothing(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: list[str],
    needle: str,
    fast: bool,
) -> None:
    from vtpmctl.cli import run

    state = tmp_path / "state"
    log = tmp_path / "log"
    args = ["serve", "--state", str(state), "--log-file", str(log), *option]
    assert run(args, fast=fast) == 2
    assert needle in capsys.readouterr().err
    assert not state.exists() and not log.exists()


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


@pytest.mark.parametrize(
    ("argv", "zygote"),
    [
        ([b"/usr/bin/python3", b"-m", b"vtpmctl", b"_zygote", b"--ready-fd", b"3"], True),
        ([b"python3", b"-I", b"-m", b"vtpmctl", b"_zygote"], True),
        ([b"python3", b"-m", b"vtpmctl", b"_daemon", b"--state", b"/s"], False),
        ([b"python3", b"-m", b"vtpmctl.device.server.zygote"], False),
        ([b"python3", b"-m", b"vtpmctl", b"start", b"_zygote"], False),
    ],
)
def test_zygote_command_lines_are_told_from_daemons(argv: list[bytes], zygote: bool) -> None:
    """A daemon the zygote forked keeps this command line; it is known by its lock instead."""
    assert runs_zygote(argv) == zygote
    if zygote:
        assert not runs_daemon(argv)


def test_entry_points_run_the_daemon_module() -> None:
    from vtpmctl.__main__ import ENTRY_POINTS
    from vtpmctl.childproc import entry_argv

    assert ENTRY_POINTS["_daemon"] == "vtpmctl.device.server.daemon"
    assert entry_argv("_daemon")[1:] == ["-m", "vtpmctl", "_daemon"]


def test_a_forked_daemons_padded_command_line_reads_as_its_arguments() -> None:
    """A daemon forked by the zygote shows its arguments in the zygote's 4 KiB of room,
    NUL-padded: status, stop and start's scan of every process read just the arguments."""
    from vtpmctl.usecases.supervisor import _arguments, runs_daemon

    padded = b"\0".join([b"/usr/bin/python3", b"-m", b"vtpmctl", b"_daemon", b"--state", b"/s"])
    args = _arguments(padded + b"\0" * 4000)
    assert args == [b"/usr/bin/python3", b"-m", b"vtpmctl", b"_daemon", b"--state", b"/s"]
    assert runs_daemon(args)
    assert _arguments(padded + b"\0") == args  # an exec'd one: one NUL at the end
    assert _arguments(b"") == []
