"""`vtpmctl serve`: one vTPM in the foreground, options as `swtpm socket` users know them.

The options are ``vtpmctl.device.server.options.SERVE_OPTIONS``; the typer
command below is derived from that table, as is the daemon's own parser
that the command line's fast route uses.
"""

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Callable

    import typer

    from vtpmctl.device.server.options import ServeOption

HELP = "Serve one vTPM in the foreground (like `swtpm socket` / `swtpm cuse`)."


def serve(**values: Any) -> int:
    """Run the daemon in this process until CMD_SHUTDOWN or SIGTERM (values by option dest)."""
    from vtpmctl.device.server.daemon import options_from_values, run

    return run(options_from_values(values))


def register(app: "typer.Typer") -> None:
    """Add `serve` to the vtpmctl app."""
    app.command("serve", help=HELP)(_typer_command())


def _typer_command() -> "Callable[..., None]":
    """A function whose signature typer reads: one parameter per row of SERVE_OPTIONS."""
    import inspect

    import typer

    from vtpmctl.commands import args
    from vtpmctl.device.server.options import SERVE_OPTIONS

    def serve_cmd(**params: Any) -> None:
        if (params["ctrl"] is None) == (params["cuse"] is None):
            raise typer.BadParameter("give exactly one of --ctrl or --cuse")
        values = {k: v.value if hasattr(v, "value") else v for k, v in params.items()}
        values["flags"] = values["flags"] or []
        raise typer.Exit(serve(**values))

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [
        inspect.Parameter(opt.dest, kind, annotation=_annotation(opt), default=_default(opt))
        for opt in SERVE_OPTIONS
    ]
    args.with_parameters(serve_cmd, params)
    return serve_cmd


def _annotation(opt: "ServeOption") -> Any:
    from typing import Annotated

    import typer

    kwargs: dict[str, Any] = {"help": opt.help}
    if opt.metavar is not None:
        kwargs["metavar"] = opt.metavar
    if opt.required:
        kwargs["show_default"] = False
    info = typer.Option(opt.flag, **kwargs)
    value_type: Any = {
        "path": Path if opt.required else Path | None,
        "text": str | None,
        "choice": opt.choices,
        "list": list[str] | None,
        "switch": bool,
    }[opt.kind]
    return Annotated[value_type, info]


def _default(opt: "ServeOption") -> Any:
    import inspect

    if opt.required:
        return inspect.Parameter.empty
    if opt.kind == "choice":
        assert opt.choices is not None
        return next(iter(opt.choices))
    return False if opt.kind == "switch" else None
