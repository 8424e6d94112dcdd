"""The vtpmctl command line: registers the command groups, nothing else.

Each module in ``vtpmctl.commands`` holds plain functions that do the work,
the declaration of their options (``COMMANDS``, rows of
``vtpmctl.commands.decl``) and a ``register(app)`` that adds the typer front
ends built from it. Importing typer costs several times more than a whole
control round trip, so a well-formed command line of a declared command
(``ROUTES``), of ``ctl`` (its ACTIONS table) or of ``serve`` (SERVE_OPTIONS)
is read here from the same declaration and calls the plain function
directly. Anything else — help, a typo, an unusual spelling — goes through
typer, which owns usage messages; both routes call the same functions with
the same arguments (tests/unit/test_fast_route.py).

Command modules must import heavy dependencies (rich, cryptography, the
engine) inside functions, so building the typer app stays cheap.
"""

import sys

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import contextlib
    from typing import Any

    import typer

    Plan = tuple[str, str, dict[str, Any]]  # module, function, keyword arguments

# The command modules, in the order their commands appear in --help.
GROUPS = (
    "vtpmctl.commands.lifecycle",
    "vtpmctl.commands.serve",
    "vtpmctl.commands.query",
    "vtpmctl.commands.ctl",
    "vtpmctl.commands.state",
    "vtpmctl.commands.key",
    "vtpmctl.commands.ek",
    "vtpmctl.commands.snapshot",
    "vtpmctl.commands.verify",
    "vtpmctl.commands.migrate",
    "vtpmctl.commands.remote",
    "vtpmctl.commands.swtpm_compat",
    "vtpmctl.commands.libvirt",
)

DEFAULT_TIMEOUT = 10.0  # same as vtpmctl.device.client.control.DEFAULT_TIMEOUT
MIN_TIMEOUT, MAX_TIMEOUT = 0.01, 86400.0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point: run one command and return its exit code.

    Called as the console script (no ``argv``), it ends the process itself
    once the command is done (``_leave``).
    """
    if argv is not None:
        return run(list(argv))
    args = sys.argv[1:]
    code = _served(args)
    if code is None:
        code = run(args)
    _leave(code)
    return code


def _served(args: list[str]) -> "int | None":
    """The exit code of ``args`` run by the command server, or None to run it here."""
    if _command_word(args) not in SERVED or UNSERVED_OPTION in args:
        return None
    from vtpmctl import cmdclient

    return cmdclient.run(args)


def _command_word(args: list[str]) -> str:
    """The command's first word, past the global options."""
    i = 0
    while i < len(args) and args[i].startswith("-"):
        i += 2 if args[i] == "--timeout" else 1
    return args[i] if i < len(args) else ""


def _leave(code: int) -> None:
    """End the process now: flush stdio, run atexit handlers, ``os._exit``.

    The interpreter's own teardown (clearing every module, collecting every
    object) cost 7 ms after a `start` had done its work: as much as the whole
    daemon side of it. It is skipped only when nothing can depend on it: no
    thread but this one, and stdio flushed without error (else the usual exit
    reports what it always reported).
    """
    import os

    threading = sys.modules.get("threading")
    if threading is not None and threading.active_count() > 1:
        return
    try:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
    except (OSError, ValueError):
        return
    import atexit

    atexit._run_exitfuncs()
    os._exit(code)


def run(args: list[str], fast: bool = True) -> int:
    """Run one command line; ``fast=False`` forces the typer route (for tests)."""
    debug = _take_debug(args)
    if not _stdout_open():
        # `vtpmctl … >&-`: like a broken pipe. A command whose output is its point
        # does nothing; any other does its work and its report goes nowhere.
        if _output_is_the_point(args):
            from vtpmctl.errors import EXIT_FAILURE

            with _suppress_os_errors():
                sys.stderr.write("vtpmctl: stdout is closed; nothing was done\n")
            return EXIT_FAILURE
        _stdout_to_devnull()
    try:
        plan = _fast_plan(args) if fast else None
        if plan is not None:
            return _execute(plan)
        return _run_typer(args)
    except KeyboardInterrupt:
        from vtpmctl.errors import EXIT_INTERRUPTED

        sys.stderr.write("vtpmctl: interrupted\n")
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        from vtpmctl.errors import EXIT_FAILURE

        # The reader went away (`vtpmctl info X | head -1`): not worth a message.
        _silence_stdout()
        return EXIT_FAILURE
    except Exception as exc:
        from vtpmctl.errors import EXIT_FAILURE, VtpmctlError

        if debug:
            import traceback

            traceback.print_exc()
        else:
            from vtpmctl.commands.output import safe

            sys.stderr.write(f"vtpmctl: {safe(_one_line(exc))}\n")
        return exc.exit_code if isinstance(exc, VtpmctlError) else EXIT_FAILURE


def _take_debug(args: list[str]) -> bool:
    """Remove every --debug before a '--', so it works anywhere on the line."""
    end = args.index("--") if "--" in args else len(args)
    found = "--debug" in args[:end]
    if found:
        args[:end] = [a for a in args[:end] if a != "--debug"]
    return found


def _one_line(exc: BaseException) -> str:
    """Our errors (and ValueErrors) are sentences; anything else also needs its kind."""
    from vtpmctl.errors import VtpmctlError

    text = " ".join(str(exc).split())
    ours = isinstance(exc, VtpmctlError) or type(exc) is ValueError
    if ours and text:
        return text
    name = type(exc).__name__
    return f"{name}: {text} (rerun with --debug for a traceback)" if text else name


def _stdout_open() -> bool:
    """Descriptor 1 is open (Python sets sys.stdout to None when it was not)."""
    import os

    if sys.stdout is None:
        return False
    try:
        fd = sys.stdout.fileno()
    except (OSError, ValueError):
        return True  # no descriptor behind it (captured in a test): writable anyway
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def _stdout_to_devnull() -> None:
    """Point descriptor 1 and sys.stdout at /dev/null.

    Besides keeping writes from failing, this takes descriptor 1, so that no
    file this process opens (a state file, a log) can land on it and receive
    what was meant for stdout.
    """
    import os

    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    if fd != 1:
        os.dup2(fd, 1, inheritable=False)
        os.close(fd)
    sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115 - lives as long as the process


def _suppress_os_errors() -> "contextlib.AbstractContextManager[None]":
    import contextlib

    return contextlib.suppress(OSError, AttributeError)


# The commands that exist to print (or to write to '-'): with stdout closed there
# is no point in running them.
_OUTPUT_COMMANDS = frozenset({"list", "caps", "info", "ek", "--version", "--help", "-h"})
_OUTPUT_SUBCOMMANDS = frozenset({("snapshot", "list"), ("snapshot", "diff")})
_EXPORTS = frozenset({("state", "export"), ("migrate", "export")})


def _output_is_the_point(args: list[str]) -> bool:
    i = 0
    while i < len(args) and args[i].startswith("--timeout"):
        i += 1 if "=" in args[i] else 2
    words = args[i:]
    if not words or "--help" in words or "-h" in words:
        return True
    if words[0] in _OUTPUT_COMMANDS or tuple(words[:2]) in _OUTPUT_SUBCOMMANDS:
        return True
    if tuple(words[:2]) in _EXPORTS:
        return "-" in words or "-o-" in words or "--output=-" in words
    return False


def _silence_stdout() -> None:
    import os

    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# ---------------------------------------------------------------- fast route


def _fast_plan(args: list[str]) -> "Plan | None":
    """The plan for a common, well-formed command line, or None to let typer decide."""
    timeout = DEFAULT_TIMEOUT
    i = 0
    while i < len(args) and args[i].startswith("-"):
        if args[i] == "--timeout" and i + 1 < len(args):
            value, i = args[i + 1], i + 2
        elif args[i].startswith("--timeout="):
            value, i = args[i].partition("=")[2], i + 1
        else:
            return None
        try:
            timeout = float(value)
        except ValueError:
            return None
        if not MIN_TIMEOUT <= timeout <= MAX_TIMEOUT:
            return None
    if i >= len(args):
        return None
    cmd, rest = args[i], args[i + 1 :]
    if cmd == "ctl":
        return _fast_ctl(rest, timeout)
    if cmd == "serve":
        return _fast_serve(rest)
    module = ROUTES.get(cmd)
    return None if module is None else _fast_declared(module, args[i:], timeout)


# The first word of each command declared in commands/decl.py terms → its module.
# tests/unit/test_fast_route.py checks this against every module's COMMANDS.
ROUTES = {
    "create": "vtpmctl.commands.lifecycle",
    "start": "vtpmctl.commands.lifecycle",
    "stop": "vtpmctl.commands.lifecycle",
    "restart": "vtpmctl.commands.lifecycle",
    "rm": "vtpmctl.commands.lifecycle",
    "list": "vtpmctl.commands.lifecycle",
    "status": "vtpmctl.commands.lifecycle",
    "caps": "vtpmctl.commands.query",
    "info": "vtpmctl.commands.query",
    "state": "vtpmctl.commands.state",
    "snapshot": "vtpmctl.commands.snapshot",
    "verify": "vtpmctl.commands.verify",
    "migrate": "vtpmctl.commands.migrate",
    "remote": "vtpmctl.commands.remote",
    "push": "vtpmctl.commands.remote",
    "pull": "vtpmctl.commands.remote",
}


# The commands a script runs often, which the command server (vtpmctl.cmdserver)
# runs in a pre-imported child. `serve` is not one of them: it becomes the daemon.
SERVED = frozenset(ROUTES) | {"ctl"}
UNSERVED_OPTION = "--foreground"  # `start --foreground` becomes the daemon, in this process


def _fast_declared(module: str, words: list[str], timeout: float) -> "Plan | None":
    """A command declared in its module's COMMANDS, read by commands.decl.parse."""
    from vtpmctl.commands import decl

    for cmd in _module(module).COMMANDS:
        n = len(cmd.words)
        if tuple(words[:n]) == cmd.words:
            kwargs = decl.parse(cmd, words[n:])
            if kwargs is None:
                return None
            if cmd.timeout:
                kwargs["timeout"] = timeout
            where, _, function = cmd.function.partition(":")
            return (where, function, kwargs)
    return None


def _fast_serve(rest: list[str]) -> "Plan | None":
    """`serve` is exec'd by tests, units and scripts; its options are the daemon's own."""
    if "-h" in rest or "--help" in rest:
        return None
    from vtpmctl.device.server.daemon import parse_serve_args

    ns = parse_serve_args(rest)
    return None if ns is None else ("vtpmctl.device.server.daemon", "run_args", {"ns": ns})


def _fast_ctl(rest: list[str], timeout: float) -> "Plan | None":
    if len(rest) < 2 or rest[0].startswith("-"):
        return None
    from vtpmctl.commands.ctl import parse_words

    parsed = parse_words(rest[1], rest[2:])
    if parsed is None:
        return None
    value, switch = parsed
    return (
        "vtpmctl.commands.ctl",
        "ctl",
        {
            "target": rest[0],
            "action": rest[1],
            "value": value,
            "delete_volatile": switch,
            "timeout": timeout,
        },
    )


def _execute(plan: "Plan") -> int:
    module, function, kwargs = plan
    result = getattr(_module(module), function)(**kwargs)
    return int(result or 0)


def _module(name: str) -> "Any":
    """The module NAME, imported (importlib itself costs an import of warnings)."""
    __import__(name)
    return sys.modules[name]


# ---------------------------------------------------------------- typer route


def build_app() -> "typer.Typer":
    """The full typer app with every command group registered."""
    import importlib
    from typing import Annotated

    import typer

    from vtpmctl import __version__

    app = typer.Typer(
        name="vtpmctl",
        help="Serve, query and manage virtual TPMs (a drop-in for swtpm + swtpm_ioctl).",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )

    def show_version(value: bool) -> None:
        if value:
            sys.stdout.write(f"vtpmctl {__version__}\n")
            raise typer.Exit()

    @app.callback()
    def global_options(
        debug: Annotated[
            bool, typer.Option("--debug", help="show a traceback when a command fails")
        ] = False,
        timeout: Annotated[
            float,
            typer.Option(
                "--timeout",
                metavar="SECONDS",
                min=MIN_TIMEOUT,
                max=MAX_TIMEOUT,
                help="how long to wait for each control reply",
            ),
        ] = DEFAULT_TIMEOUT,
        version: Annotated[
            bool,
            typer.Option(
                "--version", is_eager=True, callback=show_version, help="print the version and exit"
            ),
        ] = False,
    ) -> None:
        """Serve, query and manage virtual TPMs (a drop-in for swtpm + swtpm_ioctl)."""

    for name in GROUPS:
        importlib.import_module(name).register(app)
    return app


def _run_typer(args: list[str]) -> int:
    import typer

    try:
        from typer import _click as click  # newer typer carries its own click
    except ImportError:  # pragma: no cover - older typer on the real click
        import click  # type: ignore[no-redef,import-not-found,unused-ignore]

    from vtpmctl.commands.output import safe
    from vtpmctl.errors import EXIT_FAILURE, EXIT_OK, EXIT_USAGE

    command = typer.main.get_command(build_app())
    try:
        result = command.main(args=args, prog_name="vtpmctl", standalone_mode=False)
    except click.exceptions.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":
            # A bare `vtpmctl ctl`: show help. typer's rich formatter has printed
            # it already while building the message; plain click has not.
            text = exc.format_message()
            if text.strip():
                sys.stdout.write(text + "\n")
            return EXIT_USAGE
        # typer shows required arguments as {NAME}; a plain path reads better.
        where = exc.ctx.command_path if exc.ctx is not None else "vtpmctl"
        where = where.replace("{", "").replace("}", "")
        sys.stderr.write(
            f"{where}: {safe(_one_line_text(exc.format_message()))} (see '{where} --help')\n"
        )
        return EXIT_USAGE
    except click.exceptions.ClickException as exc:
        sys.stderr.write(f"vtpmctl: {safe(_one_line_text(exc.format_message()))}\n")
        return exc.exit_code
    except typer.Abort:
        sys.stderr.write("vtpmctl: aborted\n")
        return EXIT_FAILURE
    return result if isinstance(result, int) else EXIT_OK


def _one_line_text(text: str) -> str:
    return " ".join(text.split())
