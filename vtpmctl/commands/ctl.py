"""`vtpmctl ctl TARGET ACTION`: one control command, the way swtpm_ioctl sends it.

Success is silent (exit 0), as with swtpm_ioctl; failures raise ControlError
or TargetError and the command line prints them as one line.

``ACTIONS`` is the one table of actions: the command line's fast route
(``cli.py``), the typer commands and ``ctl()`` are all derived from it.
"""

from vtpmctl.device.client.control import DEFAULT_TIMEOUT
from vtpmctl.device.client.target import open_client, parse_target
from vtpmctl.device.protocol import InitFlag

# `typing` costs more to import than a control round trip; annotations only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    import typer

    from vtpmctl.device.client.control import ControlClient

    Send = Callable[[ControlClient, int, bool], None]  # client, value, the action's switch

# How an action takes its value.
NO_VALUE, REQUIRED, OPTIONAL = 0, 1, 2


class CtlAction:
    """One row of the table (a class with slots: `dataclasses` is slow to import)."""

    __slots__ = ("name", "help", "send", "value", "default", "largest", "arg", "switch")

    def __init__(
        self,
        name: str,
        help: str,
        send: "Send",
        *,
        value: int = NO_VALUE,
        default: int | None = None,
        largest: int = 0,
        arg: "tuple[str, str, str] | None" = None,
        switch: "tuple[str, str] | None" = None,
    ) -> None:
        self.name = name
        self.help = help  # the command's help line
        self.send = send
        self.value = value  # NO_VALUE, REQUIRED or OPTIONAL
        self.default = default  # an OPTIONAL value left out
        self.largest = largest  # values go from 0 to this
        self.arg = arg  # (parameter name, METAVAR, help) of the value
        self.switch = switch  # (--option, help) of the action's one switch


ACTIONS: "dict[str, CtlAction]" = {
    a.name: a
    for a in (
        CtlAction(
            "init",
            "(Re)initialise the TPM from its stored state (CMD_INIT).",
            lambda c, _, delete: c.init(InitFlag.DELETE_VOLATILE if delete else 0),
            switch=("--delete-volatile", "delete the volatile state once it is loaded"),
        ),
        CtlAction(
            "stop", "Stop the TPM without ending its process (CMD_STOP).", lambda c, _, __: c.stop()
        ),
        CtlAction(
            "shutdown",
            "Stop the TPM and end its process (CMD_SHUTDOWN).",
            lambda c, _, __: c.shutdown(),
        ),
        CtlAction(
            "locality",
            "Set the locality of the following TPM commands (CMD_SET_LOCALITY).",
            lambda c, n, _: c.set_locality(n),
            value=REQUIRED,
            largest=0xFF,
            arg=("n", "N", "locality for the following TPM commands (TPMs accept 0-4)"),
        ),
        CtlAction(
            "reset-established",
            "Reset the TPM-established bit (CMD_RESET_TPMESTABLISHED).",
            lambda c, n, _: c.reset_established(n),
            value=OPTIONAL,
            # libtpms lets only localities 3 and 4 reset the established bit.
            default=3,
            largest=0xFF,
            arg=("loc", "[LOC]", "locality to reset from (default 3; TPMs accept 3 or 4)"),
        ),
        CtlAction(
            "cancel",
            "Cancel a long-running TPM command (CMD_CANCEL_TPM_CMD).",
            lambda c, _, __: c.cancel(),
        ),
        CtlAction(
            "store-volatile",
            "Write the volatile state to storage; the next init resumes it.",
            lambda c, _, __: c.store_volatile(),
        ),
        CtlAction(
            "lock-storage",
            "Take the storage lock back, e.g. after an outgoing migration failed.",
            lambda c, n, _: c.lock_storage(n),
            value=OPTIONAL,
            # QEMU asks for 300 retries (3 s) when it takes the lock back.
            default=300,
            largest=0xFFFFFFFF,
            arg=("n", "[N]", "retries, 10 ms apart (default 300)"),
        ),
    )
}


def parse_words(action: str, words: list[str]) -> "tuple[int | None, bool] | None":
    """(value, switch) of ACTION's well-formed arguments, or None (typer explains)."""
    spec = ACTIONS.get(action)
    if spec is None:
        return None
    switch = spec.switch is not None and words == [spec.switch[0]]
    if switch:
        words = []
    if not words:
        return (None, switch) if spec.value != REQUIRED else None
    if spec.value == NO_VALUE or len(words) != 1:
        return None
    word = words[0]
    if not (word.isascii() and word.isdigit()) or int(word) > spec.largest:
        return None
    return int(word), switch


def ctl(
    target: str,
    action: str,
    value: int | None = None,
    delete_volatile: bool = False,
    timeout: float = DEFAULT_TIMEOUT,
) -> int:
    """Send the control command for ACTION to TARGET (``delete_volatile``: init's switch)."""
    spec = ACTIONS.get(action)
    if spec is None:
        raise ValueError(f"unknown ctl action {action!r}")
    if value is None:
        value = spec.default
    if spec.value != NO_VALUE and value is None:
        raise ValueError(f"ctl {action} needs a value")
    with open_client(parse_target(target, changes=True), timeout=timeout) as client:
        spec.send(client, value or 0, delete_volatile)
    return 0


def register(app: "typer.Typer") -> None:
    """Add the `ctl` group to the vtpmctl app: one command per row of ACTIONS."""
    from typing import Annotated

    import typer

    from vtpmctl.commands import args

    group = typer.Typer(
        name="ctl",
        no_args_is_help=True,
        help="Send one control command to a TPM (like swtpm_ioctl).",
    )

    @group.callback()
    def ctl_target(
        target: Annotated[str, args.TARGET],
    ) -> None:
        """Send one control command to a TPM (like swtpm_ioctl)."""

    for spec in ACTIONS.values():
        group.command(spec.name, help=spec.help)(_typer_command(spec))
    app.add_typer(group)


def _typer_command(spec: CtlAction) -> "Callable[..., None]":
    """The typer command of one action: its signature is built from the row."""
    import inspect
    from typing import Annotated, Any

    import typer

    from vtpmctl.commands import args

    def command(ctx: typer.Context, **params: Any) -> None:
        assert ctx.parent is not None
        value = params.get(spec.arg[0]) if spec.arg else None
        switch = bool(params.get(_switch_param(spec.switch[0]))) if spec.switch else False
        ctl(
            ctx.parent.params["target"],
            spec.name,
            value,
            delete_volatile=switch,
            timeout=ctx.find_root().params["timeout"],
        )

    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    params = [inspect.Parameter("ctx", kind, annotation=typer.Context)]
    if spec.switch is not None:
        flag, flag_help = spec.switch
        params.append(
            inspect.Parameter(
                _switch_param(flag),
                kind,
                annotation=Annotated[bool, typer.Option(flag, help=flag_help)],
                default=False,
            )
        )
    if spec.arg is not None:
        name, metavar, arg_help = spec.arg
        info = typer.Argument(
            metavar=metavar, min=0, max=spec.largest, show_default=False, help=arg_help
        )
        if spec.value == REQUIRED:
            params.append(inspect.Parameter(name, kind, annotation=Annotated[int, info]))
        else:
            params.append(
                inspect.Parameter(name, kind, annotation=Annotated[int | None, info], default=None)
            )
    args.with_parameters(command, params)
    command.__name__ = command.__qualname__ = f"{spec.name.replace('-', '_')}_cmd"
    return command


def _switch_param(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
