"""The options of ``vtpmctl serve``, declared once, as data.

``SERVE_OPTIONS`` is the only list of them. From it come the daemon's
argparse parser (``build_parser``: the fast route of ``vtpmctl serve`` and
``python -m vtpmctl _daemon``), the typer command of ``vtpmctl serve``
(``commands/serve.py``: help and usage errors), the daemon's command line
that ``vtpmctl start`` builds (``serve_argv``) and the daemon's reading of
it (``parse_plain``). Cheap to import: no typer, no dataclasses, no engine,
no argparse.
"""

from __future__ import annotations

import os
import sys

from vtpmctl.fspath import clean
from vtpmctl.model import KEY_SPEC_HELP, KEY_SPEC_METAVAR, KeyFormat, OnShutdown, TpmFamily

# Off `typing` at run time: the zygote, and so every daemon, would carry it
# (0.4 MiB; docs/architecture.md, "The zygote").
TYPE_CHECKING = False
if TYPE_CHECKING:
    import argparse
    from collections.abc import Iterable
    from enum import StrEnum
    from typing import Any, Literal, NoReturn

    Kind = Literal["path", "text", "choice", "list", "switch"]

_ENDPOINT = "unix:PATH|tcp:HOST:PORT"


class ServeOption:
    """One option: ``kind`` says how its value is read (and shown in --help)."""

    __slots__ = ("flag", "dest", "kind", "help", "metavar", "choices", "required", "aliases")

    def __init__(
        self,
        flag: str,
        kind: Kind,
        help: str | None = None,
        *,
        dest: str | None = None,
        metavar: str | None = None,
        choices: type[StrEnum] | None = None,
        required: bool = False,
        aliases: tuple[str, ...] = (),
    ) -> None:
        self.flag = flag
        self.dest = dest or flag[2:].replace("-", "_")
        self.kind: Kind = kind
        self.help = help
        self.metavar = metavar
        self.choices = choices  # a "choice" takes one of these; the first is the default
        self.required = required
        self.aliases = aliases  # also accepted by the daemon's parser (earlier spellings)

    @property
    def default(self) -> Any:
        """The value when the option is not given."""
        if self.kind == "choice":
            assert self.choices is not None
            return next(iter(self.choices)).value
        return {"list": [], "switch": False}.get(self.kind)


SERVE_OPTIONS: tuple[ServeOption, ...] = (
    ServeOption("--state", "path", "state directory (swtpm's --tpmstate dir=)", required=True),
    ServeOption("--ctrl", "text", "control channel", metavar=_ENDPOINT),
    ServeOption(
        "--data",
        "text",
        "data channel (QEMU passes its own with CMD_SET_DATAFD)",
        metavar=_ENDPOINT,
    ),
    ServeOption(
        "--admin",
        "text",
        "read-only control endpoint (0600) that answers while a hypervisor holds --ctrl",
        metavar="unix:PATH",
    ),
    ServeOption("--cuse", "text", "serve /dev/vtpm-NAME instead of sockets", metavar="NAME"),
    ServeOption("--tpm", "choice", "TPM family", choices=TpmFamily),
    ServeOption(
        "--flags",
        "list",
        "not-need-init, startup-clear, startup-state, disable-auto-shutdown",
        metavar="FLAG[,FLAG]",
    ),
    ServeOption("--key-file", "path", "state key file (0600): hex or binary AES key"),
    ServeOption(
        "--key-format",
        "choice",
        "how to read --key-file",
        dest="key_kind",
        choices=KeyFormat,
        aliases=("--key-kind",),
    ),
    ServeOption("--key", "text", KEY_SPEC_HELP, metavar=KEY_SPEC_METAVAR),
    ServeOption("--migration-key-file", "path", "key that encrypts exported state blobs"),
    ServeOption(
        "--migration-key-format",
        "choice",
        "how to read --migration-key-file",
        dest="migration_key_kind",
        choices=KeyFormat,
    ),
    ServeOption(
        "--migration-key",
        "text",
        "the migration key, as --key",
        metavar=KEY_SPEC_METAVAR,
    ),
    ServeOption("--pid-file", "path"),
    ServeOption("--log-file", "path", "log here instead of stderr"),
    ServeOption("--terminate", "switch", "exit when the data connection is lost"),
    ServeOption("--incoming", "switch", "wait for QEMU's state (incoming migration)"),
    ServeOption("--existing", "switch", "refuse to create a TPM if the state is missing"),
    ServeOption(
        "--remote-spec",
        "path",
        "keep a remote's lease and replicate the permanent state as this file says "
        "(vtpmctl start writes it)",
    ),
    ServeOption(
        "--on-shutdown",
        "choice",
        "what CMD_SHUTDOWN does: exit, or power the TPM off and serve the next client",
        choices=OnShutdown,
    ),
    ServeOption("--group", "text", "owner group of the unix sockets", metavar="GROUP"),
    ServeOption(
        "--socket-mode",
        "text",
        "mode of the unix sockets [default: 0600; 0660 with --group]",
        metavar="MODE",
    ),
)

BY_DEST = {opt.dest: opt for opt in SERVE_OPTIONS}
BY_FLAG = {name: opt for opt in SERVE_OPTIONS for name in (opt.flag, *opt.aliases)}


def parse_plain(argv: list[str]) -> dict[str, Any] | None:
    """The values (by dest) of a command line as ``serve_argv`` writes it, without argparse.

    What ``build_parser`` would give: every option by its whole name (or an alias),
    each followed by its value. Anything else (an abbreviation, ``--opt=value``, a
    value that starts with "-", a choice not among the choices, ``--help``, a missing
    required option) gives None, for argparse to parse or to say what is wrong. The
    daemon parses its own command line so: argparse, with gettext and locale, stays
    out of the zygote, and its parse out of each daemon's pages (0.4 MiB each).
    """
    values = {opt.dest: opt.default for opt in SERVE_OPTIONS}
    i = 0
    while i < len(argv):
        opt = BY_FLAG.get(argv[i])
        if opt is None:
            return None
        i += 1
        if opt.kind == "switch":
            values[opt.dest] = True
            continue
        if i == len(argv) or argv[i].startswith("-"):
            return None
        value = argv[i]
        i += 1
        if opt.kind == "list":
            values[opt.dest] = [*values[opt.dest], value]
        elif opt.kind == "choice":
            if opt.choices is None or value not in {c.value for c in opt.choices}:
                return None
            values[opt.dest] = value
        else:
            values[opt.dest] = clean(value) if opt.kind == "path" else value
    if any(opt.required and values[opt.dest] is None for opt in SERVE_OPTIONS):
        return None
    return values


def build_parser(quiet: bool = False) -> argparse.ArgumentParser:
    """The daemon's parser: the same options, names and meaning as ``vtpmctl serve``.

    argparse is imported here: ``serve_argv`` (what ``vtpmctl start`` needs) does
    without it.
    """
    import argparse

    class _QuietParser(argparse.ArgumentParser):
        """Raises instead of printing, so a caller can hand odd command lines to typer."""

        def error(self, message: str) -> NoReturn:
            raise ValueError(message)

    class _Formatter(argparse.HelpFormatter):
        """argparse's, sized as it sizes itself but without ``shutil``.

        The parser makes a formatter for every option it adds, and argparse's
        imports ``shutil`` (with ``bz2``, ``lzma``, ``zlib``) for the terminal
        width: about 0.4 MiB in the zygote, and so in every daemon's RSS.
        """

        def __init__(
            self,
            prog: str,
            indent_increment: int = 2,
            max_help_position: int = 24,
            width: int | None = None,
        ) -> None:
            if width is None:
                width = _terminal_columns() - 2
            super().__init__(prog, indent_increment, max_help_position, width)

    cls = _QuietParser if quiet else argparse.ArgumentParser
    p = cls(
        prog="vtpmctl-daemon",
        description=__doc__,
        add_help=not quiet,
        formatter_class=_Formatter,
    )
    for opt in SERVE_OPTIONS:
        names = (opt.flag, *opt.aliases)
        if opt.kind == "switch":
            p.add_argument(*names, dest=opt.dest, action="store_true", help=opt.help)
        elif opt.kind == "list":
            p.add_argument(*names, dest=opt.dest, action="append", default=[], help=opt.help)
        elif opt.kind == "choice":
            assert opt.choices is not None
            p.add_argument(
                *names,
                dest=opt.dest,
                choices=[c.value for c in opt.choices],
                default=opt.default,
                help=opt.help,
            )
        else:
            p.add_argument(
                *names,
                dest=opt.dest,
                type=clean if opt.kind == "path" else str,
                required=opt.required,
                help=opt.help,
            )
    return p


def _terminal_columns() -> int:
    """``shutil.get_terminal_size().columns``: $COLUMNS, else stdout's terminal, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        columns = os.get_terminal_size(stdout.fileno()).columns if stdout is not None else 0
    except (AttributeError, ValueError, OSError):
        columns = 0
    return columns or 80


def serve_argv(**values: Any) -> list[str]:
    """The options for ``values`` (by dest) as a command line; unset ones are left out."""
    unknown = sorted(set(values) - set(BY_DEST))
    if unknown:
        raise ValueError(f"unknown serve options {unknown}")
    argv: list[str] = []
    for opt in SERVE_OPTIONS:
        value = values.get(opt.dest)
        if value is None or value is False:
            continue
        if opt.kind == "switch":
            argv.append(opt.flag)
        elif opt.kind == "list":
            for item in _items(value):
                argv += [opt.flag, str(item)]
        else:
            argv += [opt.flag, str(value)]
    return argv


def _items(value: Iterable[Any] | str) -> list[Any]:
    return [value] if isinstance(value, str) else list(value)
