"""Each command's arguments and options, declared once, as data.

A ``Command`` names its words (``"snapshot create"``), the plain function
that does the work (``"vtpmctl.commands.snapshot:create"``), its help line
and its ``Param`` rows. Both routes of the command line come from it:

- ``parse`` is the fast route (``cli.py``): a strict reading of a
  well-formed command line into the function's keyword arguments, with no
  typer, no click, no ``typing``. Anything it is not sure of (help, a typo,
  a repeated option, ``-ofile``, a value it would have to convert in an
  unusual way) makes it answer None, and typer decides.
- ``typer_command`` builds the typer command (help, completion, usage
  errors) whose signature typer reads from the same rows.

Both end in ``call``: the same function with the same arguments.
``tests/unit/test_fast_route.py`` checks that for every declared command.
The rows of NAME, TARGET, ``--json`` and the key formats are shared
(``commands/args.py`` turns them into the typer objects older code uses).
"""

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from enum import StrEnum
    from typing import Any

    import typer

    Adapt = Callable[[dict[str, Any]], dict[str, Any]]

# How a parameter takes its value.
ARG = "arg"  # a positional word
SWITCH = "switch"  # an option without a value: "--force", or "--ek/--no-ek"
TEXT = "text"  # an option with a word
INT = "int"  # an option with a decimal number
FLOAT = "float"  # an option with a decimal fraction ("2", "0.5")
PATH = "path"  # an option with a file name (a pathlib.Path)
CHOICE = "choice"  # an option with one value of a StrEnum


class Param:
    """One argument or option (a class with slots: `dataclasses` is slow to import).

    ``dest`` is the keyword of the command's function. ``flags`` are the
    spellings of an option, typer's way (``("-o", "--output")``,
    ``("--ek/--no-ek",)``). ``default`` is what the function gets when it is
    left out (a StrEnum member for a CHOICE). ``typer`` holds the keywords
    passed to ``typer.Option``/``typer.Argument`` as well, so that --help
    stays exactly what it was.
    """

    __slots__ = ("dest", "kind", "flags", "help", "default", "required", "choices", "typer")

    def __init__(
        self,
        dest: str,
        kind: str,
        *flags: str,
        help: str,
        default: "Any" = None,
        required: bool = False,
        choices: "type[StrEnum] | None" = None,
        **typer: "Any",
    ) -> None:
        self.dest = dest
        self.kind = kind
        self.flags = flags
        self.help = help
        self.default = default
        self.required = required
        self.choices = choices
        self.typer = typer  # metavar, show_default, min, max, case_sensitive

    def renamed(self, dest: str) -> "Param":
        """The same row under another keyword (a shared option, another function's name)."""
        extra = dict(self.typer)
        return Param(
            dest,
            self.kind,
            *self.flags,
            help=self.help,
            default=self.default,
            required=self.required,
            choices=self.choices,
            **extra,
        )

    def plain(self, value: "Any") -> "Any":
        """What the function gets for ``value``: a StrEnum as its word."""
        return value.value if self.kind == CHOICE and value is not None else value

    def spellings(self) -> "dict[str, Any]":
        """Each spelling on the command line → what a SWITCH means by it (None otherwise)."""
        found: dict[str, Any] = {}
        for flag in self.flags:
            on, _, off = flag.partition("/")
            found[on] = True if self.kind == SWITCH else None
            if off:
                found[off] = False
        return found

    def typer_info(self) -> "Any":
        """The typer.Argument or typer.Option of this row."""
        import typer

        keywords = {"help": self.help, **self.typer}
        if self.kind == ARG:
            return typer.Argument(**keywords)
        return typer.Option(*self.flags, **keywords)

    def annotation(self) -> "Any":
        """The annotated type typer reads for this row."""
        from pathlib import Path
        from typing import Annotated

        value: Any = {ARG: str, SWITCH: bool, TEXT: str, INT: int, FLOAT: float, PATH: Path}.get(
            self.kind, self.choices
        )
        if not self.required and self.default is None:
            value = value | None
        return Annotated[value, self.typer_info()]


class Command:
    """One command: its words, the function that runs it and its rows.

    ``timeout``: the function also takes the global ``--timeout``.
    ``adapt``: turns the parsed values into the function's keywords, and
    raises ``UsageError`` for combinations the options alone cannot refuse
    (typer shows it as a usage error; the fast route hands the line to typer).
    """

    __slots__ = ("words", "function", "help", "params", "timeout", "adapt", "_spellings")

    def __init__(
        self,
        words: str,
        function: str,
        help: str,
        *params: Param,
        timeout: bool = False,
        adapt: "Adapt | None" = None,
    ) -> None:
        self.words = tuple(words.split())
        self.function = function
        self.help = help
        self.params = params
        self.timeout = timeout
        self.adapt = adapt
        self._spellings: dict[str, tuple[Param, Any]] | None = None

    def spellings(self) -> "dict[str, tuple[Param, Any]]":
        """Every option spelling of the command → (its row, what a switch means by it)."""
        if self._spellings is None:
            self._spellings = {
                word: (p, meaning)
                for p in self.params
                if p.kind != ARG
                for word, meaning in p.spellings().items()
            }
        return self._spellings


# ---------------------------------------------------------------- shared rows

NAME = Param("name", ARG, help="instance name", required=True, metavar="NAME", show_default=False)
TARGET = Param(
    "target",
    ARG,
    help="/dev/vtpm-NAME, unix:PATH, tcp:HOST:PORT or an instance name",
    required=True,
    metavar="TARGET",
    show_default=False,
)
JSON = Param("as_json", SWITCH, "--json", help="one JSON object on stdout", default=False)


def _key_format(flag: str, dest: str, what: str) -> Param:
    from vtpmctl.model import KeyFormat

    return Param(
        dest, CHOICE, flag, help=f"how to read {what}", choices=KeyFormat, default=KeyFormat.AUTO
    )


# How a key file given with --key-file / --migration-key-file is read (KeyFormat).
KEY_FORMAT = _key_format("--key-format", "key_format", "--key-file")
MIGRATION_KEY_FORMAT = _key_format(
    "--migration-key-format", "migration_key_format", "--migration-key-file"
)


def _key_spec(flag: str, dest: str, help: str | None = None) -> Param:
    from vtpmctl.model import KEY_SPEC_HELP, KEY_SPEC_METAVAR

    return Param(
        dest,
        TEXT,
        flag,
        help=help or KEY_SPEC_HELP,
        metavar=KEY_SPEC_METAVAR,
        show_default=False,
    )


# swtpm's --key / --migration-key syntax (vtpmctl.store.keys.parse_key_spec): a key
# or passphrase from a file or an inherited descriptor.
KEY = _key_spec("--key", "key")
MIGRATION_KEY = _key_spec("--migration-key", "migration_key", "the migration key, as --key")
# The state key of a vTPM whose key vtpmctl does not keep, for the commands that read it.
STATE_KEY = _key_spec(
    "--key",
    "key",
    "the state key, as swtpm's --key, for a vTPM whose key vtpmctl does not keep "
    "(libvirt's or Proxmox's, or one created with a key on a descriptor)",
)


def _hypervisor() -> "tuple[Param, ...]":
    from vtpmctl.model import OnShutdown

    return (
        Param(
            "group",
            TEXT,
            "--group",
            help="owner group of the sockets and run dir, e.g. libvirt-qemu "
            "(then 0660/0710 and --on-shutdown power-off by default)",
            metavar="GROUP",
            show_default=False,
        ),
        Param(
            "socket_mode",
            TEXT,
            "--socket-mode",
            help="mode of the sockets [default: 0600]",
            metavar="MODE",
            show_default=False,
        ),
        Param(
            "dir_mode",
            TEXT,
            "--dir-mode",
            help="mode of the run dir [default: 0700]",
            metavar="MODE",
            show_default=False,
        ),
        Param(
            "on_shutdown",
            CHOICE,
            "--on-shutdown",
            help="what CMD_SHUTDOWN does: exit the daemon, or power the TPM off and keep "
            "serving (for a hypervisor) [default: exit; power-off with --group]",
            choices=OnShutdown,
            show_default=False,
        ),
    )


# Who may reach an instance's endpoint and what CMD_SHUTDOWN does (create and start;
# kept in the instance's config).
HYPERVISOR = _hypervisor()

# ---------------------------------------------------------------- the fast route

_NOT_MINE = object()  # a value the fast route leaves to typer


def parse(cmd: Command, words: "list[str]") -> "dict[str, Any] | None":
    """The function's keywords for WORDS (after the command's own words), or None.

    Strict on purpose: every spelling it accepts means what typer makes of
    it; everything else is typer's (usage messages, help, odd spellings).
    """
    spellings = cmd.spellings()
    values: dict[str, Any] = {}
    positional: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if word == "-" or not word.startswith("-"):
            positional.append(word)
            continue
        name, eq, inline = word.partition("=") if word.startswith("--") else (word, "", "")
        hit = spellings.get(name)
        if hit is None:
            return None  # --help, --, a typo, -ofile, -qv: typer's
        param, meaning = hit
        if param.dest in values:
            return None  # given twice: typer's rules
        if param.kind == SWITCH:
            if eq:
                return None
            values[param.dest] = meaning
            continue
        if eq:
            raw = inline
        elif i < len(words):
            raw = words[i]
            i += 1
        else:
            return None
        value = _convert(param, raw)
        if value is _NOT_MINE:
            return None
        values[param.dest] = value
    return _finish(cmd, values, positional)


def _finish(
    cmd: Command, values: "dict[str, Any]", positional: "list[str]"
) -> "dict[str, Any] | None":
    """Place the positional words, fill in defaults and adapt; None if typer must decide."""
    args = [p for p in cmd.params if p.kind == ARG]
    if len(positional) > len(args):
        return None
    for param, word in zip(args, positional, strict=False):
        values[param.dest] = word
    for param in cmd.params:
        if param.dest not in values:
            if param.required:
                return None
            values[param.dest] = param.plain(param.default)
    if cmd.adapt is not None:
        from vtpmctl.errors import UsageError

        try:
            values = cmd.adapt(values)
        except UsageError:
            return None  # typer words the usage error
    return values


def _convert(param: Param, raw: str) -> "Any":
    if raw.startswith("-") and raw != "-":
        return _NOT_MINE  # `--label -x`: an option or a value? typer's call
    if param.kind == TEXT:
        return raw
    if param.kind == INT:
        if not (raw.isascii() and raw.isdigit()):
            return _NOT_MINE
        number = int(raw)
        low, high = param.typer.get("min"), param.typer.get("max")
        if (low is not None and number < low) or (high is not None and number > high):
            return _NOT_MINE
        return number
    if param.kind == FLOAT:
        whole, _, fraction = raw.partition(".")
        if not (whole + fraction).isascii() or not (whole + fraction).isdigit():
            return _NOT_MINE  # "1e3", "inf", "nan", " 1": typer's reading
        return float(raw)
    if param.kind == PATH:
        if not raw:
            return _NOT_MINE
        from pathlib import Path

        return Path(raw)
    assert param.kind == CHOICE and param.choices is not None
    return raw if raw in param.choices._value2member_map_ else _NOT_MINE


def call(cmd: Command, kwargs: "dict[str, Any]") -> int:
    """Run the command's function with KWARGS; its exit code."""
    import sys

    module, _, function = cmd.function.partition(":")
    __import__(module)  # importlib itself costs an import of warnings
    result = getattr(sys.modules[module], function)(**kwargs)
    return int(result or 0)


# ---------------------------------------------------------------- the typer route


def register(parent: "typer.Typer", commands: "tuple[Command, ...]") -> None:
    """Add each command's typer front end to PARENT (the app or a group), in order."""
    for cmd in commands:
        parent.command(cmd.words[-1], help=cmd.help)(typer_command(cmd))


def typer_command(cmd: Command) -> "Callable[..., None]":
    """A function whose signature typer reads: one parameter per row, in order."""
    import inspect
    from typing import Any

    import typer

    from vtpmctl.commands.args import with_parameters
    from vtpmctl.errors import UsageError

    def command(ctx: typer.Context, **params: Any) -> None:
        values = {p.dest: p.plain(params[p.dest]) for p in cmd.params}
        if cmd.adapt is not None:
            try:
                values = cmd.adapt(values)
            except UsageError as exc:
                raise typer.BadParameter(str(exc)) from None
        if cmd.timeout:
            values["timeout"] = ctx.find_root().params["timeout"]
        raise typer.Exit(call(cmd, values))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    signature = [inspect.Parameter("ctx", kind, annotation=typer.Context)]
    for p in cmd.params:
        default = inspect.Parameter.empty if p.required else p.default
        signature.append(
            inspect.Parameter(p.dest, kind, annotation=p.annotation(), default=default)
        )
    with_parameters(command, signature)
    command.__name__ = command.__qualname__ = "_".join(cmd.words).replace("-", "_") + "_cmd"
    return command
